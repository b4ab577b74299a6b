// A fixed sequence of phases that every thread of one parallel region walks through together
// (team.cpp runs a decode step's layers this way).
//
// Why: on two threads a parallel region costs about 4 us of fork and join beyond its work, and
// a decode step of 30 layers made about 300 of them. Here the threads are forked once and a
// phase boundary is a wait on a counter. A phase is split in chunks that whichever thread asks
// first takes, so no chunk depends on how many threads there are or which runs it (each
// writes outputs of its own), and one thread alone runs every chunk.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace readmoe {

class Phases {
 public:
  explicit Phases(int64_t count) : counters_(static_cast<size_t>(count)) {}

  // One thread's place in the sequence
  struct Cursor {
    int64_t next = 0;
  };

  // phase cursor.next: runs chunk(c) for each chunk c of [0, chunks) this thread claims, then
  // waits until every chunk of the phase is done (its writes visible here). After a chunk
  // threw, later chunks are skipped and rethrow() throws that error once the region ends.
  template <typename Chunk>
  void run(Cursor& cursor, int64_t chunks, Chunk&& chunk) {
    if (cursor.next >= static_cast<int64_t>(counters_.size())) {  // every thread sees this
      fail(std::make_exception_ptr(std::logic_error("more phases run than planned")));
      return;
    }
    Counter& counter = counters_[static_cast<size_t>(cursor.next++)];
    for (int64_t c; (c = counter.claimed.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          chunk(c);
        } catch (...) {
          fail(std::current_exception());
        }
      }
      counter.done.fetch_add(1, std::memory_order_release);
    }
    for (int spins = 0; counter.done.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < kSpins) {
        pause();
      } else {
        std::this_thread::yield();  // the other thread lost its core: let it back
      }
    }
  }

  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr int kSpins = 1 << 16;

  struct alignas(64) Counter {
    std::atomic<int64_t> claimed{0};
    std::atomic<int64_t> done{0};
  };

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void fail(std::exception_ptr error) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = error;
    failed_.store(true, std::memory_order_relaxed);
  }

  std::vector<Counter> counters_;
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace readmoe
