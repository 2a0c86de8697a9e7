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
        int32_t s = 0;
        if (r < n) {
            int8_t* blk = data + (r / kNBlock) * kNBlock * h.kp;
            const int64_t j = r % kNBlock;
            for (int64_t c = 0; c < k; ++c) {
                const int8_t v = w[r * ldw + c];
                blk[(c / 4) * 64 + j * 4 + (c % 4)] = v;
                s += v;
            }
        }
        colsum[r] = s;
    }
    return Status::ok();
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
    if (h.n < 0 || h.k < 0 || h.n > kMaxDim || h.k > kMaxDim || h.np != round_up(h.n, kNBlock) ||
        h.kp != round_up(h.k, kKAlign) || nbytes != packed_nbytes(h.n, h.k))
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
