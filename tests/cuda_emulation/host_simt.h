// Runs the CUDA kernel bodies of csrc/include/aquakv/*.cuh on the host, one fiber per GPU thread.
//
// A block's threads are fibers (ucontext) switched at every barrier: `sync()` is __syncthreads,
// and `shfl_xor` is a write to a slot, a barrier, a read of the partner lane's slot and a barrier.
// Between two barriers the fibers run one after another, in ascending order on even phases and
// descending on odd ones, and shared memory starts each block filled with NaN bytes: a missing
// barrier or a read of memory nobody wrote shows up as a wrong or NaN result, not as luck.
// A barrier reached by some threads while others have finished is reported (a hang on a GPU).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

namespace aquakv::emu {

class HostBlock;

// The kernel bodies' execution context (same interface as aquakv::cuda::DeviceSimt).
struct HostSimt {
  HostBlock* blk;
  int tid;
  int nthreads;
  int64_t block_id;
  int64_t nblocks;
  int thread() const { return tid; }
  int threads() const { return nthreads; }
  int64_t block() const { return block_id; }
  int64_t blocks() const { return nblocks; }
  inline void sync() const;
  inline float shfl_xor(float v, int mask) const;
};

class HostBlock {
 public:
  using Body = std::function<void(const HostSimt&)>;

  HostBlock(int nthreads, size_t smem_bytes)
      : nthreads_(nthreads), fibers_(nthreads), slots_(nthreads), smem_((smem_bytes + 15) / 16 + 1) {
    for (auto& f : fibers_) f.stack.reset(new unsigned char[kStackBytes]);  // uninitialised: pages stay lazy
  }

  float* smem() { return reinterpret_cast<float*>(smem_.data()); }

  // Runs block `block_id` of a grid of `nblocks` blocks to completion.
  void run(int64_t block_id, int64_t nblocks, const Body& body) {
    std::memset(smem_.data(), 0xff, smem_.size() * sizeof(Vec16));  // NaN floats, 0xff bytes
    body_ = &body;
    block_id_ = block_id;
    nblocks_ = nblocks;
    for (int t = 0; t < nthreads_; ++t) {
      Fiber& f = fibers_[t];
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &scheduler_;
      makecontext(&f.ctx, &HostBlock::entry, 0);
    }
    for (int64_t phase = 0;; ++phase) {
      int done = 0;
      for (int i = 0; i < nthreads_; ++i) {
        const int t = phase % 2 == 0 ? i : nthreads_ - 1 - i;
        if (fibers_[t].done) {
          ++done;
          continue;
        }
        current_ = this;
        running_ = t;
        swapcontext(&scheduler_, &fibers_[t].ctx);
        if (fibers_[t].done) ++done;
      }
      if (done == nthreads_) break;
      if (done > 0) {
        std::fprintf(stderr, "emulator: block %lld: %d of %d threads finished while the others wait at a barrier\n",
                     static_cast<long long>(block_id), done, nthreads_);
        std::abort();
      }
    }
  }

  void barrier(int tid) { swapcontext(&fibers_[tid].ctx, &scheduler_); }
  float* slots() { return slots_.data(); }

 private:
  struct Vec16 {
    alignas(16) unsigned char b[16];
  };
  struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<unsigned char[]> stack;
    bool done = false;
  };
  static constexpr size_t kStackBytes = 256 * 1024;

  static void entry() {
    HostBlock* self = current_;
    const int t = self->running_;
    const HostSimt simt{self, t, self->nthreads_, self->block_id_, self->nblocks_};
    (*self->body_)(simt);
    self->fibers_[t].done = true;  // returning resumes uc_link: the scheduler
  }

  int nthreads_;
  std::vector<Fiber> fibers_;
  std::vector<float> slots_;
  std::vector<Vec16> smem_;
  ucontext_t scheduler_{};
  const Body* body_ = nullptr;
  int64_t block_id_ = 0, nblocks_ = 1;
  int running_ = 0;
  static inline HostBlock* current_ = nullptr;
};

inline void HostSimt::sync() const { blk->barrier(tid); }

inline float HostSimt::shfl_xor(float v, int mask) const {
  blk->slots()[tid] = v;
  blk->barrier(tid);
  const float other = blk->slots()[(tid & ~31) | ((tid & 31) ^ mask)];
  blk->barrier(tid);
  return other;
}

// Runs a whole grid: every block, one after another, on `nblocks` blocks of `nthreads`.
inline void run_grid(int64_t nblocks, int nthreads, size_t smem_bytes,
                     const std::function<void(const HostSimt&, float* smem)>& body) {
  HostBlock block(nthreads, smem_bytes);
  for (int64_t b = 0; b < nblocks; ++b) {
    float* smem = block.smem();
    block.run(b, nblocks, [&](const HostSimt& s) { body(s, smem); });
  }
}

}  // namespace aquakv::emu
