// The machine's read bandwidth as the panel products see it: engine_speed.py's roofline.
//
// Why: a roofline divides the bytes a step reads by how fast the machine reads them, and
// torch's sum reads one sequential stream a thread: 18 GB/s on one core of the AMD EPYC this
// project runs on, where the one-row panel products, which read four panels side by side
// (gemm_avx2.cpp's stream_rows), reach 25. A core's prefetchers run a distance ahead of each
// stream they follow, so a core reads several streams faster than one (and streams far apart,
// 128 MB, slower than neighbouring ones). Read here with 1-16 streams a thread; the caller
// times the calls and keeps the best.

#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace readmoe {
namespace {

constexpr int64_t kLineWords = 16;  // 32-bit words of a 64-byte cache line
constexpr int64_t kRunLines = 4096;  // a stream's run: 256 KB, about a K = 1536 panel

// words [S][part] (parts `part` apart) read a line of each stream in turn, xor'd together
template <int S>
uint32_t read_side_by_side(const uint32_t* words, int64_t part) {
#if defined(__AVX2__)
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t i = 0; i + kLineWords <= part; i += kLineWords) {
    for (int s = 0; s < S; ++s) {
      const auto* line = reinterpret_cast<const __m256i*>(words + s * part + i);
      acc[0] = _mm256_xor_si256(acc[0], _mm256_loadu_si256(line));
      acc[1] = _mm256_xor_si256(acc[1], _mm256_loadu_si256(line + 1));
    }
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_xor_si256(acc[0], acc[1]));
#else
  uint32_t lanes[kLineWords] = {};
  for (int64_t i = 0; i + kLineWords <= part; i += kLineWords) {
    for (int s = 0; s < S; ++s) {
      const uint32_t* line = words + s * part + i;
      for (int64_t j = 0; j < kLineWords; ++j) lanes[j] ^= line[j];
    }
  }
#endif
  uint32_t all = 0;
  for (const uint32_t word : lanes) all ^= word;
  return all;
}

}  // namespace

int64_t read_streams(const at::Tensor& x, int64_t streams) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.nbytes() % 4 == 0,
              "read_streams reads a contiguous CPU tensor of whole 32-bit words");
  TORCH_CHECK(streams == 1 || streams == 2 || streams == 4 || streams == 8 || streams == 16,
              "streams must be 1, 2, 4, 8 or 16, got ", streams);
  const auto* words = static_cast<const uint32_t*>(x.data_ptr());
  const int64_t lines = static_cast<int64_t>(x.nbytes()) / 64;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::atomic<uint32_t> checksum{0};
  // each thread's lines in blocks of `streams` neighbouring runs of kRunLines, read side by
  // side (as a product's neighbouring panels are); a remainder of less than a block is unread
  const int64_t block = streams * kRunLines;
  const int64_t blocks = lines / block;
  at::parallel_for(0, blocks, (blocks + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    uint32_t got = 0;
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t* first = words + b * block * kLineWords;
      constexpr int64_t part = kRunLines * kLineWords;
      switch (streams) {
        case 1: got ^= read_side_by_side<1>(first, part); break;
        case 2: got ^= read_side_by_side<2>(first, part); break;
        case 4: got ^= read_side_by_side<4>(first, part); break;
        case 8: got ^= read_side_by_side<8>(first, part); break;
        default: got ^= read_side_by_side<16>(first, part); break;
      }
    }
    checksum.fetch_xor(got);
  });
  return checksum.load();
}

}  // namespace readmoe
