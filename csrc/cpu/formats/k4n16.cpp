// K4N16 packing: pack, view (header checks) and unpack of the dense int8 weight layout.
#include "cpu/formats/k4n16.h"

#include <cstring>
#include <string>

namespace fastinfer::cpu {

Status pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t out_nbytes) {
    Status st = check_dims(n, k, ldw, "pack_weight");
    if (!st.is_ok()) return st;
    if (out_nbytes != packed_nbytes(n, k))
        return Status::invalid("pack_weight: output buffer has the wrong size");
    PackHeader h{};
    h.magic = kPackMagic;
    h.version = kPackVersion;
    h.layout = kLayoutK4N16;
    h.n = n;
    h.k = k;
    h.np = round_up(n, kNBlock);
    h.kp = round_up(k, kKAlign);
    std::memcpy(out, &h, sizeof(h));
    auto* colsum = reinterpret_cast<int32_t*>(out + sizeof(h));
    int8_t* data = reinterpret_cast<int8_t*>(out + sizeof(h) + 4 * h.np);
    std::memset(data, 0, size_t(h.np * h.kp));
    for (int64_t r = 0; r < h.np; ++r) {
        uint32_t s = 0;  // mod 2^32, as the kernels accumulate (no signed overflow for K past 2^24)
        if (r < n) {
            int8_t* blk = data + (r / kNBlock) * kNBlock * h.kp;
            const int64_t j = r % kNBlock;
            for (int64_t c = 0; c < k; ++c) {
                const int8_t v = w[r * ldw + c];
                blk[(c / 4) * 64 + j * 4 + (c % 4)] = v;
                s += uint32_t(int32_t(v));
            }
        }
        colsum[r] = int32_t(s);
    }
    return Status::ok();
}

bool checked_packed_nbytes(int64_t n, int64_t k, int64_t* nbytes) {
    if (n < 0 || k < 0 || n > kMaxDim || k > kMaxDim) return false;
    const int64_t np = round_up(n, kNBlock), kp = round_up(k, kKAlign);  // <= 2^40 + 63: no overflow
    int64_t blocks, total;
    if (__builtin_mul_overflow(np, kp, &blocks)) return false;
    if (__builtin_add_overflow(blocks, int64_t(sizeof(PackHeader)) + 4 * np, &total)) return false;
    *nbytes = total;
    return true;
}

Status view_packed(const uint8_t* buf, int64_t nbytes, PackedW* view) {
    if (nbytes < int64_t(sizeof(PackHeader))) return Status::invalid("packed weight: buffer too small");
    PackHeader h;
    std::memcpy(&h, buf, sizeof(h));
    if (h.magic != kPackMagic) return Status::invalid("packed weight: bad magic (not a fastinfer packed weight)");
    if (h.version != kPackVersion)
        return Status::invalid("packed weight: format version " + std::to_string(h.version) +
                               ", this build reads version " + std::to_string(kPackVersion));
    if (h.layout != kLayoutK4N16) return Status::invalid("packed weight: unknown layout");
    int64_t want = 0;
    if (!checked_packed_nbytes(h.n, h.k, &want) || h.np != round_up(h.n, kNBlock) || h.kp != round_up(h.k, kKAlign) ||
        nbytes != want)
        return Status::invalid("packed weight: header and buffer size disagree");
    if (reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("packed weight: buffer must be 64-byte aligned");
    view->n = h.n;
    view->k = h.k;
    view->np = h.np;
    view->kp = h.kp;
    view->colsum = reinterpret_cast<const int32_t*>(buf + sizeof(h));
    view->data = reinterpret_cast<const int8_t*>(buf + sizeof(h) + 4 * h.np);
    return Status::ok();
}

Status validate_packed(const uint8_t* buf, int64_t nbytes) {
    PackedW v;
    Status st = view_packed(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    PackHeader h;
    std::memcpy(&h, buf, sizeof(h));
    bool unused_zero = h.reserved == 0;
    for (uint8_t b : h.pad) unused_zero = unused_zero && b == 0;
    if (!unused_zero) return Status::invalid("packed weight: reserved header bytes are not zero");
    for (int64_t nb = 0; nb < v.np / kNBlock; ++nb) {
        const int8_t* blk = v.data + nb * kNBlock * v.kp;
        uint32_t sums[kNBlock] = {};  // mod 2^32, as the kernels accumulate
        for (int64_t g = 0; g < v.kp / 4; ++g)
            for (int64_t j = 0; j < kNBlock; ++j)
                for (int64_t c = 0; c < 4; ++c) {
                    const int8_t val = blk[g * 64 + j * 4 + c];
                    if (val == 0) continue;
                    if (nb * kNBlock + j >= v.n || g * 4 + c >= v.k)
                        return Status::invalid("packed weight: a padding byte is not zero (channel " +
                                               std::to_string(nb * kNBlock + j) + ", k " + std::to_string(g * 4 + c) +
                                               ")");
                    sums[j] += uint32_t(int32_t(val));
                }
        for (int64_t j = 0; j < kNBlock; ++j)
            if (uint32_t(v.colsum[nb * kNBlock + j]) != sums[j])
                return Status::invalid("packed weight: stored column sum of channel " + std::to_string(nb * kNBlock + j) +
                                       " does not match its weights");
    }
    return Status::ok();
}

Status unpack_weight(const uint8_t* buf, int64_t nbytes, int8_t* w) {
    PackedW v;
    Status st = view_packed(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    for (int64_t r = 0; r < v.n; ++r) {
        const int8_t* blk = v.data + (r / kNBlock) * kNBlock * v.kp;
        for (int64_t c = 0; c < v.k; ++c) w[r * v.k + c] = blk[(c / 4) * 64 + (r % kNBlock) * 4 + c % 4];
    }
    return Status::ok();
}

}  // namespace fastinfer::cpu
