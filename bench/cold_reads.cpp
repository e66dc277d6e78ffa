// How fast one core reads one 8-byte field from each of 4,000 objects after the caches were
// flushed, as a many-small step's table scan reads torch's tensor metadata: the objects `stride`
// bytes apart (256: many to a page; 4096 and up: one page each, as metadata between 16 KiB
// allocations is), read in blocks of 64 with independent loads, with and without a software
// prefetch pass over each block first. README ("Where a many-small step's time goes") cites it.
//
//   g++ -O2 -o /tmp/cold_reads bench/cold_reads.cpp && /tmp/cold_reads
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kObjects = 4000;
constexpr int kBlock = 64;
constexpr int kField = 168;  // where TensorImpl keeps its dispatch key set (torch 2.13)
constexpr int kRepeats = 30;

double now_us() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::micro>(Clock::now().time_since_epoch()).count();
}

// Microseconds to read the field of every object once, after a 256 MiB pass has flushed the
// caches (and the TLB), averaged over kRepeats.
double time_reads(const std::vector<char*>& objects, std::vector<char>& flush, bool prefetch) {
  volatile long sink = 0;
  double total = 0.0;
  for (int r = 0; r < kRepeats; ++r) {
    long s = 0;
    for (size_t i = 0; i < flush.size(); i += 64) s += flush[i];
    const double start = now_us();
    for (int b = 0; b < kObjects; b += kBlock) {
      const int e = std::min(kObjects, b + kBlock);
      if (prefetch) {
        for (int i = b; i < e; ++i) __builtin_prefetch(objects[i] + kField);
      }
      for (int i = b; i < e; ++i) {
        long v;
        std::memcpy(&v, objects[i] + kField, sizeof v);
        s += (v & 1) ? v : -1;
      }
    }
    total += now_us() - start;
    sink = sink + s;
  }
  return total / kRepeats;
}

}  // namespace

int main() {
  std::vector<char> flush(size_t(256) << 20, 1);
  std::printf("stride (bytes)  plain ns/object  prefetched ns/object\n");
  for (const size_t stride : {256, 1024, 4096, 16640, 65600}) {
    std::vector<char*> blocks, objects;
    for (int i = 0; i < kObjects; ++i) {
      char* block = static_cast<char*>(std::malloc(stride + 256));
      std::memset(block, 1, stride + 256);
      blocks.push_back(block);
      objects.push_back(block + 16 * (i % 4));  // malloc's 16-byte alignment, all four phases
    }
    const double plain = time_reads(objects, flush, false);
    const double prefetched = time_reads(objects, flush, true);
    std::printf("%14zu  %15.1f  %20.1f\n", stride, 1e3 * plain / kObjects,
                1e3 * prefetched / kObjects);
    for (char* block : blocks) std::free(block);
  }
}
