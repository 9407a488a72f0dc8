// bench_limits: the machine's own limits, which backprompt's speed is measured against.
//
//   bench_limits [-t THREADS] [--quick] [--bandwidth [--file PATH]] [--gemm f32|bf16]
//
// - Peak GEMM throughput per arithmetic type, with oneDNN (the library backprompt's prefill uses):
//   f32 (dnnl_sgemm), bf16 (matmul primitive, bf16 x bf16 -> f32) and int8 (u8 x s8 -> s32), on
//   a prefill-like shape (512 x 2048 x 2048), weights in the layout oneDNN prefers. bf16 and int8
//   are only meaningful on CPUs with AVX512_BF16 / VNNI (or AMX); elsewhere oneDNN emulates them
//   and the figure says so by being low. The ISA oneDNN dispatches to is printed.
// - Memory read bandwidth: streaming reads of a 512 MiB buffer (much larger than any cache),
//   what decode is bound by (it reads every weight once per token).
// Each figure is the best of several runs (min time): the machine may be shared, and the best
// run is the one least disturbed. Measured with 1 thread and with THREADS (default: all cores).
// --bandwidth measures only the read bandwidth with THREADS (about a second): bench/speed.sh
// runs it next to each decode measurement, because a shared machine's bandwidth drifts (2x
// within minutes has been seen). --bandwidth --file PATH also reads PATH the way decode reads
// weights (a read-only shared mapping of the file, through the page cache; one pass to fault it
// in, then the same loop): on some hosts such pages read slower than fresh anonymous memory, and
// this is the bound decode actually works against. --gemm f32 or --gemm bf16 measures only that
// GEMM with THREADS (a few seconds), for the same reason: bench/speed.sh runs it next to each
// prefill measurement.
//
// The last lines are machine-readable, for bench/speed.sh:
//   limit <name> <value>     gemm_f32, gemm_bf16, gemm_s8 (GFLOP/s or GOP/s), bandwidth and
//                            file_bandwidth (GB/s),
//                            with THREADS threads; the same names suffixed _1t for one thread.
#include <dnnl.h>
#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Best seconds per call of fn over at least `min_s` seconds of calls (and at least 3 calls).
template <typename F>
double best_time(F fn, double min_s) {
  fn();  // warm-up: JIT, page faults, caches
  double best = 1e30, total = 0;
  for (int i = 0; i < 3 || total < min_s; ++i) {
    const Clock::time_point t0 = Clock::now();
    fn();
    const double s = seconds_since(t0);
    best = std::min(best, s);
    total += s;
  }
  return best;
}

constexpr int64_t M = 512, N = 2048, K = 2048;  // tokens x outputs x inputs
constexpr double GEMM_OPS = 2.0 * M * N * K;

double gemm_f32(double min_s) {
  std::vector<float> a(M * K, 0.5f), b(N * K, 0.25f), c(M * N);  // [M][K], [N][K], [M][N]
  const double s = best_time([&] { dnnl_sgemm('N', 'T', M, N, K, 1.0f, a.data(), K, b.data(), K, 0.0f, c.data(), N); }, min_s);
  return GEMM_OPS / s / 1e9;
}

// A oneDNN matmul src[M][K] (src_dt) x weights[K][N] (wei_dt, oneDNN's preferred layout) ->
// dst[M][N] (dst_dt). Returns GOP/s, or 0 if oneDNN has no implementation here.
double gemm_primitive(dnnl::memory::data_type src_dt, dnnl::memory::data_type wei_dt, dnnl::memory::data_type dst_dt,
                      double min_s, std::string* impl) {
  using dnnl::memory;
  try {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    const memory::desc src_md({M, K}, src_dt, memory::format_tag::ab);
    const memory::desc wei_any({K, N}, wei_dt, memory::format_tag::any);
    const memory::desc dst_md({M, N}, dst_dt, memory::format_tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_any, dst_md), eng);
    *impl = pd.impl_info_str();
    memory src(src_md, eng), wei(pd.weights_desc(), eng), dst(dst_md, eng);
    std::memset(src.get_data_handle(), 1, src_md.get_size());
    std::memset(wei.get_data_handle(), 1, pd.weights_desc().get_size());
    dnnl::matmul prim(pd);
    const double s = best_time(
        [&] {
          prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
          strm.wait();
        },
        min_s);
    return GEMM_OPS / s / 1e9;
  } catch (const dnnl::error& e) {
    *impl = std::string("unavailable: ") + e.what();
    return 0.0;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t read_block(const uint8_t* p, size_t n) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    acc0 = _mm256_xor_si256(acc0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    acc1 = _mm256_xor_si256(acc1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    acc2 = _mm256_xor_si256(acc2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    acc3 = _mm256_xor_si256(acc3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(acc0, acc1), _mm256_xor_si256(acc2, acc3));
  return static_cast<uint64_t>(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 3));
}
bool can_read_fast() { return __builtin_cpu_supports("avx2"); }
#else
uint64_t read_block(const uint8_t*, size_t) { return 0; }
bool can_read_fast() { return false; }
#endif

uint64_t read_block_portable(const uint8_t* p, size_t n) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc[4] = {};
  for (size_t i = 0; i + 4 <= n / 8; i += 4) {
    for (int j = 0; j < 4; ++j) acc[j] ^= w[i + j];
  }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

// GB/s reading `bytes` bytes with the current number of threads, each its own contiguous part.
double read_bandwidth(const uint8_t* buf, size_t bytes, double min_s) {
  volatile uint64_t sink = 0;
  const bool fast = can_read_fast();
  const double s = best_time(
      [&] {
        uint64_t total = 0;
#pragma omp parallel reduction(^ : total)
        {
          const size_t n_threads = static_cast<size_t>(omp_get_num_threads()), t = static_cast<size_t>(omp_get_thread_num());
          const size_t chunk = bytes / n_threads / 4096 * 4096;
          const uint8_t* p = buf + t * chunk;
          total ^= fast ? read_block(p, chunk) : read_block_portable(p, chunk);
        }
        sink = sink ^ total;
      },
      min_s);
  return static_cast<double>(bytes) / s / 1e9;
}

// read_bandwidth over a read-only shared mapping of the file at `path`; -1 if it cannot be read.
double file_bandwidth(const std::string& path, int n_threads, double min_s) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return -1;
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0) {
    close(fd);
    return -1;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* p = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return -1;
  const size_t unit = size_t{4096} * static_cast<size_t>(n_threads);  // every thread reads whole pages
  const double gbs = size >= unit ? read_bandwidth(static_cast<const uint8_t*>(p), size / unit * unit, min_s) : -1;
  munmap(p, size);
  return gbs;
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

const char* isa_name(dnnl_cpu_isa_t isa) {
  switch (isa) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
  }
}

}  // namespace

int main(int argc, char** argv) {
  int n_threads = omp_get_num_procs();
  bool quick = false, bandwidth_only = false;
  std::string file, gemm_only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "-t" || a == "--threads") && i + 1 < argc) {
      n_threads = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--bandwidth") {
      bandwidth_only = true;
    } else if (a == "--file" && i + 1 < argc) {
      file = argv[++i];
    } else if (a == "--gemm" && i + 1 < argc && (std::string(argv[i + 1]) == "f32" || std::string(argv[i + 1]) == "bf16")) {
      gemm_only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: bench_limits [-t THREADS] [--quick] [--bandwidth [--file PATH]] [--gemm f32|bf16]\n");
      return 2;
    }
  }
  const double min_s = quick ? 0.2 : 1.0;
  using dt = dnnl::memory::data_type;
  if (!gemm_only.empty()) {
    omp_set_num_threads(n_threads);
    std::string impl;
    const double gops = gemm_only == "f32" ? gemm_f32(min_s) : gemm_primitive(dt::bf16, dt::bf16, dt::f32, min_s, &impl);
    std::printf("limit gemm_%s %.1f\n", gemm_only.c_str(), gops);
    return 0;
  }
  const size_t bytes = size_t{512} << 20;
  std::unique_ptr<uint8_t, decltype(&std::free)> buf(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes)), &std::free);
  if (!buf) {
    std::fprintf(stderr, "bench_limits: cannot allocate %zu bytes\n", bytes);
    return 1;
  }
  std::memset(buf.get(), 7, bytes);
  if (bandwidth_only) {
    omp_set_num_threads(n_threads);
    std::printf("limit bandwidth %.1f\n", read_bandwidth(buf.get(), bytes, min_s));
    if (!file.empty()) {
      const double gbs = file_bandwidth(file, n_threads, min_s);
      if (gbs < 0) {
        std::fprintf(stderr, "bench_limits: cannot read %s\n", file.c_str());
        return 1;
      }
      std::printf("limit file_bandwidth %.1f\n", gbs);
    }
    return 0;
  }

  const dnnl_version_t* v = dnnl_version();
  std::printf("cpu: %s, %d cores; oneDNN %d.%d.%d dispatches to %s\n", cpu_name().c_str(), omp_get_num_procs(), v->major,
              v->minor, v->patch, isa_name(dnnl_get_effective_cpu_isa()));
  double load[1] = {0};
  if (getloadavg(load, 1) == 1) std::printf("load average: %.2f before the run\n", load[0]);

  struct Row {
    std::string name, unit;
    double one = 0, all = 0;
  };
  std::vector<Row> rows;
  std::string impl_bf16, impl_s8;
  for (int threads : {1, n_threads}) {
    omp_set_num_threads(threads);
    const bool first = threads == 1;
    auto put = [&](const std::string& name, const std::string& unit, double value) {
      auto it = std::find_if(rows.begin(), rows.end(), [&](const Row& r) { return r.name == name; });
      if (it == rows.end()) it = rows.insert(rows.end(), Row{name, unit});
      (first ? it->one : it->all) = value;
    };
    put("gemm_f32", "GFLOP/s", gemm_f32(min_s));
    put("gemm_bf16", "GFLOP/s", gemm_primitive(dt::bf16, dt::bf16, dt::f32, min_s, &impl_bf16));
    put("gemm_s8", "GOP/s", gemm_primitive(dt::u8, dt::s8, dt::s32, min_s, &impl_s8));
    put("bandwidth", "GB/s", read_bandwidth(buf.get(), bytes, min_s));
    if (n_threads == 1) {
      for (Row& r : rows) r.all = r.one;
      break;
    }
  }

  std::printf("GEMM %lldx%lldx%lld (tokens x outputs x inputs), best of runs; read bandwidth over %zu MiB\n",
              static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), bytes >> 20);
  std::printf("%-10s %14s %14s\n", "limit", "1 thread", (std::to_string(n_threads) + " threads").c_str());
  for (const Row& r : rows) std::printf("%-10s %8.1f %-5s %8.1f %-5s\n", r.name.c_str(), r.one, r.unit.c_str(), r.all, r.unit.c_str());
  std::printf("bf16 implementation: %s\nint8 implementation: %s\n", impl_bf16.c_str(), impl_s8.c_str());
  for (const Row& r : rows) std::printf("limit %s %.1f\n", r.name.c_str(), r.all);
  for (const Row& r : rows) std::printf("limit %s_1t %.1f\n", r.name.c_str(), r.one);
  return 0;
}
