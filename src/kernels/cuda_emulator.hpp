// CUDA C's execution model on the CPU, so that the tests run our `.cu` kernels (`choices.cu`,
// `paged_attention.cu`, `fused_epilogue.cu`) on machines without a GPU and compare them with
// the CPU kernels they must equal (`cuda_emulator.rs` compiles and drives this). No GPU
// emulator is packaged for CI (HIP-CPU and friends are neither on the registries nor kept for
// CUDA's warp intrinsics), and these kernels use little of CUDA, so this is hand-written.
//
// A block's threads are fibers run by one OS thread in turn, each on its own stack:
// a thread runs until it reaches `__syncthreads()` or a warp shuffle, and the barrier opens
// when every thread of the block (of the warp) waits at it. Each warp runs as far as it can
// before the next starts, first to last or (`reversed`) last to first: the tests run each
// launch both ways, and a value one thread writes while another reads it with no barrier
// between (a race, which a GPU's scheduling may order either way) then differs. A barrier some threads can never
// reach (a `__syncthreads()` in divergent code, a thread that returned while others wait, a
// shuffle with a lane missing), which is undefined on a GPU, is an error here rather than a
// hang. Blocks run one after another, so `__shared__` arrays are plain statics; the dynamic
// shared memory of a launch is filled with NaNs, as uninitialised memory may read. The math
// is the C library's (within an ulp or two of CUDA's `expf`, `logf`): compare with tolerances.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

enum class State { Ready, AtSyncthreads, AtShuffle, Done };

// A fiber's saved state. On x86-64 a switch saves the callee-saved registers on the fiber's own
// stack and swaps stack pointers (`emu_switch`, a few instructions: swapcontext's signal-mask
// system call on every switch made a barrier of 256 threads cost a millisecond); elsewhere,
// ucontext.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
extern "C" void emu_switch(void** save_sp, void* to_sp);
inline void switch_to(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
// `c` starts `entry` (which never returns) on `stack` when switched to.
inline void start(Context& c, std::vector<char>& stack, void (*entry)()) {
    void** sp = reinterpret_cast<void**>(
        reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15));
    *--sp = nullptr;                               // the entry's return address: none
    *--sp = reinterpret_cast<void*>(entry);        // where emu_switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start(Context& c, std::vector<char>& stack, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack.data();
    c.uc.uc_stack.ss_size = stack.size();
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

struct Thread {
    Context context;
    dim3 idx;
    unsigned int linear = 0;
    State state = State::Ready;
    // A shuffle's value, as its bits, in alternate slots: a lane writes the next shuffle's
    // slot while its partners may still read this one's.
    unsigned long long exchange[2] = {0, 0};
    unsigned int shuffles = 0;
    std::vector<char> stack;
};

inline dim3 block_idx, block_dim, grid_dim;
inline std::vector<Thread> threads;
inline unsigned int block_threads = 0;
inline Thread* current = nullptr;
inline Context scheduler;
inline std::string error;
inline std::vector<float> dynamic_shared_memory;
inline void (*kernel_body)() = nullptr;
// Whether a block's threads run from the last to the first between barriers (`emu_launch`'s
// caller compares the two orders: results that differ are a race).
inline bool reversed = false;

inline void fail(const std::string& why) {
    if (error.empty()) error = why;
}

// The running thread leaves off: straight to the next thread of its warp that this pass has
// yet to run (first to last, or last to first), or back to the scheduler after the warp's last.
inline void leave(State at) {
    Thread* me = current;
    me->state = at;
    const unsigned int lo = me->linear & ~31u;
    const unsigned int hi = lo + 32 < block_threads ? lo + 32 : block_threads;
    Thread* next = nullptr;
    if (!reversed) {
        for (unsigned int i = me->linear + 1; i < hi && !next; ++i)
            if (threads[i].state == State::Ready) next = &threads[i];
    } else {
        for (unsigned int i = me->linear; i-- > lo && !next;)
            if (threads[i].state == State::Ready) next = &threads[i];
    }
    if (next) {
        current = next;
        switch_to(me->context, next->context);
    } else {
        switch_to(me->context, scheduler);
    }
}

inline void syncthreads() { leave(State::AtSyncthreads); }

// `__shfl_xor_sync`: every lane of the warp must take part (the kernels pass a full mask).
template <typename T>
T shfl_xor(unsigned int mask, T v, int lane_mask, int width) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle of at most 8 bytes");
    if (mask != 0xffffffffu || width != 32) fail("a shuffle with a partial mask or width");
    Thread* me = current;
    const unsigned int slot = me->shuffles++ & 1u;
    std::memcpy(&me->exchange[slot], &v, sizeof(T));
    leave(State::AtShuffle);  // every lane has written
    const unsigned int partner = (me->linear & ~31u) | ((me->linear & 31u) ^ (unsigned)lane_mask);
    T r = v;
    if (partner < block_threads) {
        std::memcpy(&r, &threads[partner].exchange[slot], sizeof(T));
    } else {
        fail("a shuffle from a lane past the block");
    }
    return r;
}

inline void thread_entry() {
    kernel_body();
    leave(State::Done);
}

// Runs `body` (the kernel with its arguments bound) over the grid; false, with `error`, when a
// barrier could not open.
inline bool run(dim3 grid, dim3 block, size_t shared_bytes, void (*body)()) {
    grid_dim = grid;
    block_dim = block;
    kernel_body = body;
    const unsigned int n = block.x * block.y * block.z;
    block_threads = n;
    if (threads.size() < n) threads.resize(n);  // fibers' stacks kept from launch to launch
    for (unsigned int i = 0; i < n; ++i)
        if (threads[i].stack.empty()) threads[i].stack.resize(256 * 1024);
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                block_idx = dim3{bx, by, bz};
                dynamic_shared_memory.assign(shared_bytes / sizeof(float) + 1, NAN);
                for (unsigned int i = 0; i < n; ++i) {
                    Thread& t = threads[i];
                    t.linear = i;
                    t.idx = dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                    t.state = State::Ready;
                    t.shuffles = 0;
                    start(t.context, t.stack, thread_entry);
                }
                // Each warp in turn runs as far as it can (its shuffles opening as soon as all
                // its lanes wait at them) before the next starts: one warp runs ahead of the
                // others up to the block's next __syncthreads(), as a GPU may schedule it.
                const unsigned int warps = (n + 31) / 32;
                for (;;) {
                    for (unsigned int k = 0; k < warps; ++k) {
                        const unsigned int w = reversed ? warps - 1 - k : k;
                        const unsigned int lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
                        for (;;) {
                            // the pass's first thread to run; each hands on to the next
                            // (`leave`), the last back here
                            for (unsigned int j = 0; j < hi - lo; ++j) {
                                Thread& t = threads[reversed ? hi - 1 - j : lo + j];
                                if (t.state != State::Ready) continue;
                                current = &t;
                                switch_to(scheduler, t.context);
                                current = nullptr;
                                break;
                            }
                            if (!error.empty()) return false;
                            bool all = true, any = false;
                            for (unsigned int i = lo; i < hi; ++i) {
                                all = all && threads[i].state == State::AtShuffle;
                                any = any || threads[i].state == State::AtShuffle;
                            }
                            if (!any) break;
                            if (!all) {
                                fail("a warp shuffle that not every lane of the warp reached");
                                return false;
                            }
                            for (unsigned int i = lo; i < hi; ++i) threads[i].state = State::Ready;
                        }
                    }
                    // Every thread now waits at __syncthreads() or is done.
                    size_t done = 0, at_sync = 0;
                    for (unsigned int i = 0; i < n; ++i) {
                        done += threads[i].state == State::Done;
                        at_sync += threads[i].state == State::AtSyncthreads;
                    }
                    if (done == n) break;
                    if (at_sync == n) {
                        for (unsigned int i = 0; i < n; ++i) threads[i].state = State::Ready;
                        continue;
                    }
                    fail("a __syncthreads() that not every thread of the block reached (" +
                         std::to_string(at_sync) + " of " + std::to_string(n) + ", block " +
                         std::to_string(bx) + ")");
                    return false;
                }
            }
    return true;
}

// A launch's arguments as cuLaunchKernel takes them (pointers to each value), bound to a
// kernel's parameters by their types; `signature` spells the types, one letter each, so that
// the caller's arguments are checked against the kernel's.
template <typename T>
constexpr char code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, double>) return 'd';
    else if constexpr (std::is_same_v<U, int>) return 'i';
    else if constexpr (std::is_same_v<U, unsigned int>) return 'u';
    else if constexpr (std::is_pointer_v<U>) {
        using P = std::remove_cv_t<std::remove_pointer_t<U>>;
        if constexpr (std::is_same_v<P, float>) return 'F';
        else if constexpr (std::is_same_v<P, double>) return 'D';
        else if constexpr (std::is_same_v<P, unsigned int>) return 'U';
        else if constexpr (std::is_same_v<P, unsigned short>) return 'H';
        else if constexpr (std::is_same_v<P, void>) return 'V';
        else return '?';
    } else return '?';
}

template <typename... A>
std::string signature(void (*)(A...)) {
    return std::string{code<A>()...};
}

inline void** arguments = nullptr;

template <typename... A, size_t... I>
void call(void (*kernel)(A...), std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(arguments[I])...);
}

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

// The kernel `Kernel` called with `arguments`: a registered kernel's body.
template <auto Kernel>
void bound() {
    call(Kernel, std::make_index_sequence<arity(Kernel)>{});
}

struct Entry {
    const char* name;
    std::string signature;
    void (*body)();
};

inline std::vector<Entry>& registry() {
    static std::vector<Entry> r;
    return r;
}

struct Register {
    template <typename... A>
    Register(const char* name, void (*kernel)(A...), void (*body)()) {
        registry().push_back(Entry{name, signature(kernel), body});
    }
};

inline float int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float uint_as_float(unsigned int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned int float_as_uint(float f) {
    unsigned int i;
    std::memcpy(&i, &f, 4);
    return i;
}

// float16 <-> float32 as PTX's cvt (round to nearest even), through the compiler's _Float16.
inline float half_to_float(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline unsigned short float_to_half(float f) {
    const _Float16 x = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}

}  // namespace emu

#ifdef EMU_LAUNCH_ENTRY
#if defined(__x86_64__)
// emu_switch(save_sp, to_sp): the System V callee-saved registers pushed, the stack pointer
// saved to *save_sp and replaced by to_sp, theirs popped, and on.
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif
// The one entry `cuda_emulator.rs` calls (defined in one translation unit of the library):
// `name`'s kernel over `grid` blocks of `block` threads with `shared_bytes` of dynamic shared
// memory and `args` (pointers to each argument, spelled by `signature`), its threads run last
// to first between barriers where `reversed`. 0 when it ran, else
// 1 with the reason in `why` (at most `why_len` bytes, NUL included).
extern "C" int emu_launch(const char* name, const unsigned int* grid, const unsigned int* block,
                          unsigned int shared_bytes, const char* signature, void** args,
                          int reversed, char* why, size_t why_len) {
    emu::error.clear();
    emu::reversed = reversed != 0;
    const emu::Entry* entry = nullptr;
    for (const emu::Entry& e : emu::registry())
        if (std::strcmp(e.name, name) == 0) entry = &e;
    if (entry == nullptr) {
        emu::fail(std::string("no kernel named ") + name);
    } else if (entry->signature != signature) {
        emu::fail(std::string(name) + " takes (" + entry->signature + "), given (" + signature +
                  ")");
    } else if (block[0] * block[1] * block[2] == 0 || block[0] * block[1] * block[2] > 1024) {
        emu::fail("a block of 0 or more than 1024 threads");
    } else {
        emu::arguments = args;
        emu::run(emu::dim3{grid[0], grid[1], grid[2]}, emu::dim3{block[0], block[1], block[2]},
                 shared_bytes, entry->body);
        emu::arguments = nullptr;
    }
    if (emu::error.empty()) return 0;
    std::snprintf(why, why_len, "%s", emu::error.c_str());
    return 1;
}
#endif

// What the kernels' CUDA C names means here.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::emu::current->idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, o, ...) ::emu::shfl_xor((mask), (v), (o), 32)
#define __int_as_float(i) ::emu::int_as_float(i)
#define __uint_as_float(i) ::emu::uint_as_float(i)
#define __float_as_uint(f) ::emu::float_as_uint(f)

using std::isfinite;
using std::isnan;
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
