#include "cpu/runtime/threads.h"

#include <dlfcn.h>
#include <pthread.h>

#include <cstdio>
#include <cstring>
#include <set>

namespace fastinfer::cpu {
namespace {
std::atomic<int> g_pinned{0};  // 0: follow omp_get_max_threads()

// libgomp is not fork-safe: a child forked after the parent ran a parallel region inherits a team
// whose threads do not exist, and its next parallel region waits for them for ever (torch's own
// parallel ops hang there too, unless the child sets torch.set_num_threads(1) as DataLoader
// workers do). So a forked child runs our loops on its one thread: slower, never stuck.
std::atomic<bool> g_forked{false};
void on_fork_child() { g_forked.store(true); }
const bool g_atfork_registered = [] { return pthread_atfork(nullptr, nullptr, &on_fork_child) == 0; }();
}  // namespace

int num_threads() {
    if (g_forked.load(std::memory_order_relaxed)) return 1;
    const int pinned = g_pinned.load(std::memory_order_relaxed);
    return pinned > 0 ? pinned : std::max(1, omp_get_max_threads());
}

bool in_forked_child() { return g_forked.load(); }

void set_num_threads(int n) { g_pinned.store(n > 0 ? n : 0, std::memory_order_relaxed); }

std::string openmp_library() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) && info.dli_fname) return info.dli_fname;
    return "";
}

std::string openmp_libraries_loaded() {
    std::set<std::string> found;
    if (FILE* f = std::fopen("/proc/self/maps", "r")) {
        char line[4096];
        while (std::fgets(line, sizeof(line), f)) {
            const char* path = std::strchr(line, '/');
            if (!path) continue;
            const char* base = std::strrchr(path, '/') + 1;
            if (std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp", 7) == 0 ||
                std::strncmp(base, "libomp", 6) == 0) {
                std::string p(path);
                if (!p.empty() && p.back() == '\n') p.pop_back();
                found.insert(p);
            }
        }
        std::fclose(f);
    }
    std::string out;
    for (const auto& p : found) out += (out.empty() ? "" : ":") + p;
    return out;
}

}  // namespace fastinfer::cpu
