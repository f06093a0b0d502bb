// miner._topk: keep the k best *valid* candidates of every query while streaming score blocks.
// Two helpers ride along: candidate_similarity (near-duplicate check) and fold_whitespace (same-text keys).
//
// update_topk streams one block scores float32[q, b] (column j is document offset + j) into the
// running state (vals float32[q, k], ids int64[q, k]), skipping scores outside [floor, ceiling] and
// excluded document ids. merge_topk keeps the k best entries of each row of a (vals, ids) matrix.
//
// Contract, shared with the numpy fallback in miner/topk.py and tested against one reference:
// best first, ties to the lower id, -1 / -inf padding, -inf never a candidate, NaN rejected with
// ValueError, the state left untouched when anything is rejected. Policy (backend choice, thread
// count, dtype conversion, friendly validation) lives in miner/topk.py; the checks here only keep
// the kernel memory-safe when it is called directly.
//
// Speed: each row is scanned 16 floats at a time (AVX2 when the CPU has it, else SSE2) against
// [lo, ceiling], where lo is the larger of the floor and the row's current k-th value, so almost
// every score is rejected by two vector compares and never reaches the candidate buffer. NaN passes
// that test by construction (every comparison with NaN is false), so detecting it costs nothing. A
// row that starts empty first takes a provable lower bound of its k-th value from group maxima of
// its first segment (seed_bound). Rows are shared out to worker threads, the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define MINER_TOPK_SSE2 1
#endif

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;
using IdArray = py::array_t<int64_t, py::array::c_style>;

constexpr float kInf = std::numeric_limits<float>::infinity();
// The lowest finite float: a lower bound of `lowest` keeps -inf out of the candidates.
constexpr float kLowest = std::numeric_limits<float>::lowest();
// Below this many scores per thread, starting a thread costs more than it saves.
constexpr int64_t kMinScoresPerThread = int64_t{1} << 18;

struct Entry {
  float v;
  int64_t id;
};

// a ranks before b: higher score first, ties to the lower document id. A function object, not a
// function, so that std::nth_element / std::sort inline it instead of calling through a pointer.
struct Better {
  bool operator()(const Entry& a, const Entry& b) const {
    return a.v > b.v || (a.v == b.v && a.id < b.id);
  }
};
constexpr Better better{};

// The k best entries offered so far. Candidates go to a buffer of up to 2k + 16 entries; when it
// fills, keep_best() keeps the best k and their worst one becomes the bar a new candidate must
// beat. Amortised O(1) per candidate, against O(log k) unpredictable branches for a heap.
class TopK {
 public:
  explicit TopK(std::size_t k) : k_(k), capacity_(2 * k + 16) { buf_.reserve(capacity_); }

  // True once k entries are known: then only entries that rank before worst() can matter.
  bool full() const { return full_; }
  const Entry& worst() const { return worst_; }

  // Starts from a state row in canonical form: entries best first, then id -1 padding.
  void load(const float* vals, const int64_t* ids) {
    buf_.clear();
    for (std::size_t j = 0; j < k_ && ids[j] >= 0; ++j) buf_.push_back({vals[j], ids[j]});
    full_ = buf_.size() == k_;
    if (full_) worst_ = buf_.back();
  }

  void clear() {
    buf_.clear();
    full_ = false;
  }

  // Adds e, which the caller has checked ranks before worst() (when full()).
  void push(const Entry& e) {
    buf_.push_back(e);
    if (buf_.size() == capacity_) keep_best();
  }

  // Writes the best k entries best first, pads with -inf / -1.
  void store(float* vals, int64_t* ids) {
    if (buf_.size() > k_) keep_best();
    std::sort(buf_.begin(), buf_.end(), better);
    std::size_t j = 0;
    for (; j < buf_.size(); ++j) {
      vals[j] = buf_[j].v;
      ids[j] = buf_[j].id;
    }
    for (; j < k_; ++j) {
      vals[j] = -kInf;
      ids[j] = -1;
    }
  }

 private:
  // Keeps the best k entries of the buffer. The k-th score is selected on a float copy (cheap
  // compares), then branch-free passes keep the scores above it and, lowest ids first, as many of
  // the scores equal to it as fit.
  void keep_best() {
    const std::size_t n = buf_.size();
    keys_.resize(n);
    for (std::size_t j = 0; j < n; ++j) keys_[j] = buf_[j].v;
    const auto nth = keys_.begin() + static_cast<std::ptrdiff_t>(k_ - 1);
    std::nth_element(keys_.begin(), nth, keys_.end(), std::greater<float>());
    const float kth = *nth;
    kept_.resize(n);
    ties_.resize(n);
    std::size_t above = 0, tied = 0;
    for (std::size_t j = 0; j < n; ++j) {
      const Entry e = buf_[j];
      kept_[above] = e;
      above += e.v > kth;
      ties_[tied] = e;
      tied += e.v == kth;
    }
    const std::size_t need = k_ - above;  // above < k <= above + tied
    const auto last = ties_.begin() + static_cast<std::ptrdiff_t>(need - 1);
    if (tied > need) std::nth_element(ties_.begin(), last, ties_.begin() + tied, better);
    worst_ = *std::max_element(ties_.begin(), last + 1, better);  // the kept tie of highest id
    std::copy(ties_.begin(), last + 1, kept_.begin() + static_cast<std::ptrdiff_t>(above));
    kept_.resize(k_);
    buf_.swap(kept_);
    full_ = true;
  }

  std::size_t k_;
  std::size_t capacity_;
  std::vector<Entry> buf_;
  std::vector<float> keys_;             // keep_best scratch
  std::vector<Entry> kept_, ties_;      // keep_best scratch
  bool full_ = false;
  Entry worst_{-kInf, -1};
};

inline int lowest_bit(uint32_t bits) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(bits);
#else
  int i = 0;
  while (!(bits & 1u)) {
    bits >>= 1;
    ++i;
  }
  return i;
#endif
}

// Runs fn(begin, end) over row ranges on up to n_threads threads (the caller is one of them).
// An exception in any worker stops the others from taking new rows and is rethrown here.
template <class Fn>
void parallel_rows(int64_t n_rows, int64_t rows_per_task, int n_threads, Fn fn) {
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    try {
      for (;;) {
        const int64_t begin = next.fetch_add(rows_per_task);
        if (begin >= n_rows) break;
        fn(begin, std::min(n_rows, begin + rows_per_task));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n_rows);
    }
  };
  std::vector<std::thread> pool;
  struct Joiner {  // joins started workers even if starting the next one throws
    std::vector<std::thread>& pool;
    ~Joiner() {
      for (auto& t : pool)
        if (t.joinable()) t.join();
    }
  } joiner{pool};
  pool.reserve(static_cast<std::size_t>(std::max(0, n_threads - 1)));
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

int threads_for(int64_t n_rows, int64_t n_scores, int requested) {
  const int64_t by_work = std::max<int64_t>(1, n_scores / kMinScoresPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min({int64_t{requested}, n_rows, by_work})));
}

int64_t rows_per_task(int64_t n_rows, int64_t row_len, int n_threads) {
  if (n_threads <= 1) return std::max<int64_t>(1, n_rows);
  const int64_t by_work = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_len));
  return std::max<int64_t>(1, std::min(by_work, n_rows / (4 * int64_t{n_threads})));
}

// --- the prefilter ------------------------------------------------------------------------------
//
// next(s, j, end, lo, hi, &bits, above) looks at s[j, end) 16 scores at a time ((end - j) % 16 == 0)
// and returns the start of the first group holding a lane that passes !(x < lo) && !(x > hi), i.e.
// lo <= x <= hi or x is NaN, with that group's passing lanes in bits; or end. If above is not null,
// it adds the scores > hi of every group it looked at, the returned one included. One version per
// instruction set, picked at run time: a row calls it once per group with a hit, which is rare once
// the row's bar is up, so the call costs nothing next to the loop inside.
using NextFn = int64_t (*)(const float*, int64_t, int64_t, float, float, uint32_t*, int64_t*);

int64_t next_scalar(const float* s, int64_t j, int64_t end, float lo, float hi, uint32_t* bits,
                    int64_t* above) {
  for (; j < end; j += 16) {
    uint32_t b = 0;
    for (int t = 0; t < 16; ++t) {
      const float x = s[j + t];
      b |= static_cast<uint32_t>(!(x < lo) && !(x > hi)) << t;
      if (above) *above += x > hi;
    }
    if (b) {
      *bits = b;
      return j;
    }
  }
  return end;
}

#ifdef MINER_TOPK_SSE2
int64_t next_sse2(const float* s, int64_t j, int64_t end, float lo, float hi, uint32_t* bits,
                  int64_t* above) {
  const __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi);
  __m128i count = _mm_setzero_si128();
  for (; j < end; j += 16) {
    const __m128 x0 = _mm_loadu_ps(s + j), x1 = _mm_loadu_ps(s + j + 4);
    const __m128 x2 = _mm_loadu_ps(s + j + 8), x3 = _mm_loadu_ps(s + j + 12);
    const __m128 m0 = _mm_and_ps(_mm_cmpnlt_ps(x0, vlo), _mm_cmpngt_ps(x0, vhi));
    const __m128 m1 = _mm_and_ps(_mm_cmpnlt_ps(x1, vlo), _mm_cmpngt_ps(x1, vhi));
    const __m128 m2 = _mm_and_ps(_mm_cmpnlt_ps(x2, vlo), _mm_cmpngt_ps(x2, vhi));
    const __m128 m3 = _mm_and_ps(_mm_cmpnlt_ps(x3, vlo), _mm_cmpngt_ps(x3, vhi));
    if (above) {  // a true lane is -1: subtracting counts it
      count = _mm_sub_epi32(count, _mm_castps_si128(_mm_cmpgt_ps(x0, vhi)));
      count = _mm_sub_epi32(count, _mm_castps_si128(_mm_cmpgt_ps(x1, vhi)));
      count = _mm_sub_epi32(count, _mm_castps_si128(_mm_cmpgt_ps(x2, vhi)));
      count = _mm_sub_epi32(count, _mm_castps_si128(_mm_cmpgt_ps(x3, vhi)));
    }
    if (_mm_movemask_ps(_mm_or_ps(_mm_or_ps(m0, m1), _mm_or_ps(m2, m3)))) {
      *bits = static_cast<uint32_t>(_mm_movemask_ps(m0)) |
              static_cast<uint32_t>(_mm_movemask_ps(m1)) << 4 |
              static_cast<uint32_t>(_mm_movemask_ps(m2)) << 8 |
              static_cast<uint32_t>(_mm_movemask_ps(m3)) << 12;
      break;
    }
  }
  if (above) {
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), count);
    *above += int64_t{lanes[0]} + lanes[1] + lanes[2] + lanes[3];
  }
  return std::min(j, end);
}
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define MINER_TOPK_AVX2 1
#include <immintrin.h>
// The same loop 8 lanes wide, compiled for AVX2 in this function only (the module stays portable).
__attribute__((target("avx2"))) int64_t next_avx2(const float* s, int64_t j, int64_t end, float lo,
                                                  float hi, uint32_t* bits, int64_t* above) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  __m256i count = _mm256_setzero_si256();
  for (; j < end; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(s + j), x1 = _mm256_loadu_ps(s + j + 8);
    const __m256 m0 = _mm256_and_ps(_mm256_cmp_ps(x0, vlo, _CMP_NLT_UQ),
                                    _mm256_cmp_ps(x0, vhi, _CMP_NGT_UQ));
    const __m256 m1 = _mm256_and_ps(_mm256_cmp_ps(x1, vlo, _CMP_NLT_UQ),
                                    _mm256_cmp_ps(x1, vhi, _CMP_NGT_UQ));
    if (above) {
      count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(x0, vhi, _CMP_GT_OQ)));
      count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(x1, vhi, _CMP_GT_OQ)));
    }
    if (_mm256_movemask_ps(_mm256_or_ps(m0, m1))) {
      *bits = static_cast<uint32_t>(_mm256_movemask_ps(m0)) |
              static_cast<uint32_t>(_mm256_movemask_ps(m1)) << 8;
      break;
    }
  }
  if (above) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), count);
    for (int t = 0; t < 8; ++t) *above += lanes[t];
  }
  return std::min(j, end);
}
#endif

// The group maxima of seed_bound: m[g] = max(m[g], max over r < size of s[r * groups + g]), scores
// above hi (and NaN) left out. A plain loop, vectorised by the compiler for each instruction set.
using GroupMaxFn = void (*)(float*, const float*, int64_t, int64_t, float);

#if defined(__GNUC__)
#define MINER_TOPK_INLINE inline __attribute__((always_inline))
#else
#define MINER_TOPK_INLINE inline
#endif

MINER_TOPK_INLINE void group_max_body(float* m, const float* s, int64_t size, int64_t groups,
                                      float hi) {
  for (int64_t r = 0; r < size; ++r) {
    const float* x = s + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float v = x[g] <= hi ? x[g] : -kInf;  // above the ceiling, or NaN: not a candidate
      m[g] = m[g] < v ? v : m[g];
    }
  }
}

void group_max(float* m, const float* s, int64_t size, int64_t groups, float hi) {
  group_max_body(m, s, size, groups, hi);
}

#ifdef MINER_TOPK_AVX2
__attribute__((target("avx2"))) void group_max_avx2(float* m, const float* s, int64_t size,
                                                    int64_t groups, float hi) {
  group_max_body(m, s, size, groups, hi);
}
#endif

// One instruction set's versions of the vector loops.
struct Simd {
  std::string name;
  NextFn next;
  GroupMaxFn group_max;
};

// The instruction sets this CPU can run, fastest first.
std::vector<Simd> simd_available() {
  std::vector<Simd> out;
#ifdef MINER_TOPK_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) out.push_back({"avx2", next_avx2, group_max_avx2});
#endif
#ifdef MINER_TOPK_SSE2
  out.push_back({"sse2", next_sse2, group_max});
#endif
  out.push_back({"scalar", next_scalar, group_max});
  return out;
}

const Simd& simd_named(const std::string& name) {
  static const auto available = simd_available();
  if (name == "auto") return available.front();
  for (const auto& simd : available)
    if (simd.name == name) return simd;
  throw py::value_error("simd must be 'auto' or one this CPU supports, got '" + name + "'");
}

// One block update, as raw pointers: nothing here touches a Python object.
struct Block {
  const float* scores;  // [q, b]
  int64_t q, b, offset, k;
  const float* vals;  // [q, k] state, read only until the commit
  const int64_t* ids;
  const float* ceiling;  // [q] or null
  const float* floor;    // [q] or null
  const int64_t* indptr;  // [q + 1] or null
  const int64_t* excluded;
  const Simd* simd;
};

// Per-row results, kept apart from the state until the whole block has been checked for NaN.
struct Staged {
  float* vals;     // [q, k]
  int64_t* ids;    // [q, k]
  uint8_t* changed;  // [q]
  int64_t* above;  // [q] scores strictly above the ceiling
};

// Per-thread scratch.
struct RowScan {
  explicit RowScan(std::size_t k) : top(k) {}
  TopK top;
  std::vector<int64_t> excluded;  // this row's excluded ids inside the block, sorted
  std::vector<float> maxima;      // group maxima for seed_bound
};

// A lower bound of the need-th best score <= hi in s[0, n), or -inf if n is too short: the need-th
// largest of the maxima of 2 * need disjoint groups. Those need maxima are need distinct scores at
// least that large, so no smaller score can be among the need best. On random data it lands close
// to the need-th best, so a fresh row starts with a high bar instead of admitting ~k log(b / k)
// candidates while its bar rises. Group g is s[g], s[g + groups], s[g + 2 * groups], ...: the maxima
// are a running elementwise max over consecutive slices, a loop the compiler vectorises with no
// horizontal reductions, over a segment the scan then reads again from cache.
float seed_bound(const float* s, int64_t n, int64_t need, float hi, GroupMaxFn group_max_fn,
                 std::vector<float>& maxima) {
  constexpr int64_t kMinGroup = 8;
  const int64_t groups = 2 * need;
  const int64_t size = n / groups;
  if (size < kMinGroup) return -kInf;
  maxima.assign(static_cast<std::size_t>(groups), -kInf);
  group_max_fn(maxima.data(), s, size, groups, hi);
  const auto nth = maxima.begin() + (need - 1);
  std::nth_element(maxima.begin(), nth, maxima.end(), std::greater<float>());
  return *nth;
}

// Scans row i; returns the column of a NaN, or -1.
template <bool kCountAbove>
int64_t scan_row(const Block& blk, int64_t i, RowScan& scratch, const Staged& out) {
  const float* s = blk.scores + i * blk.b;
  const float* row_vals = blk.vals + i * blk.k;
  const int64_t* row_ids = blk.ids + i * blk.k;
  const float hi = blk.ceiling ? blk.ceiling[i] : kInf;
  const float fl = blk.floor ? std::max(blk.floor[i], kLowest) : kLowest;

  // The state is canonical, so its last slot is the worst kept entry (id -1 while not full).
  bool full = row_ids[blk.k - 1] >= 0;
  Entry worst{row_vals[blk.k - 1], row_ids[blk.k - 1]};
  float lo = full ? std::max(worst.v, fl) : fl;  // a score below lo cannot enter
  bool loaded = false;
  bool excluded_ready = false;
  int64_t nan_col = -1;

  auto gather_excluded = [&]() {  // this row's excluded ids inside the block, sorted, once
    if (excluded_ready) return;
    scratch.excluded.clear();
    if (blk.indptr) {
      for (int64_t p = blk.indptr[i]; p < blk.indptr[i + 1]; ++p) {
        const int64_t d = blk.excluded[p];
        if (d >= blk.offset && d - blk.offset < blk.b) scratch.excluded.push_back(d);
      }
      std::sort(scratch.excluded.begin(), scratch.excluded.end());
    }
    excluded_ready = true;
  };

  // Exact test for a score that passed the prefilter (which may have used an older, lower lo).
  auto consider = [&](int64_t j) {
    const float x = s[j];
    if (x != x) {
      nan_col = j;
      return;
    }
    const Entry e{x, blk.offset + j};
    if (full && !better(e, worst)) return;
    if (blk.indptr) {
      gather_excluded();
      if (std::binary_search(scratch.excluded.begin(), scratch.excluded.end(), e.id)) return;
    }
    if (!loaded) {
      scratch.top.load(row_vals, row_ids);
      loaded = true;
    }
    scratch.top.push(e);
    if (scratch.top.full()) {
      full = true;
      worst = scratch.top.worst();
      lo = std::max(worst.v, fl);
    }
  };

  if (!full) {  // a fresh row: raise the bar from the first segment (excluded ids may hide in it)
    const int64_t seg = std::min(blk.b, std::max<int64_t>(int64_t{1} << 14, 128 * blk.k));
    gather_excluded();
    const auto& ex = scratch.excluded;
    const int64_t in_seg = std::lower_bound(ex.begin(), ex.end(), blk.offset + seg) - ex.begin();
    lo = std::max(lo, seed_bound(s, seg, blk.k + in_seg, hi, blk.simd->group_max, scratch.maxima));
  }

  const int64_t end = blk.b - blk.b % 16;  // the prefilter takes 16 scores at a time
  int64_t above = 0;
  int64_t j = 0;
  for (;;) {
    uint32_t bits = 0;
    j = blk.simd->next(s, j, end, lo, hi, &bits, kCountAbove ? &above : nullptr);
    if (j >= end) break;
    while (bits && nan_col < 0) {
      consider(j + lowest_bit(bits));
      bits &= bits - 1;
    }
    if (nan_col >= 0) return nan_col;
    j += 16;
  }
  for (j = end; j < blk.b && nan_col < 0; ++j) {
    const float x = s[j];
    if (kCountAbove) above += x > hi;
    if (!(x < lo) && !(x > hi)) consider(j);
  }
  if (nan_col >= 0) return nan_col;

  if (loaded) {
    scratch.top.store(out.vals + i * blk.k, out.ids + i * blk.k);
    out.changed[i] = 1;
  }
  if (kCountAbove) out.above[i] = above;
  return -1;
}

template <class T>
const T* data_or_null(const std::optional<py::array_t<T, py::array::c_style>>& a) {
  return a ? a->data() : nullptr;
}

template <class T>
void check_shape_1d(const std::optional<py::array_t<T, py::array::c_style>>& a, const char* name,
                    int64_t n) {
  if (a && (a->ndim() != 1 || a->shape(0) != n))
    throw py::value_error(std::string(name) + " must have shape (" + std::to_string(n) + ",)");
}

void update_topk(const FloatArray& scores, int64_t offset, FloatArray& vals, IdArray& ids,
                 const std::optional<FloatArray>& ceiling, const std::optional<FloatArray>& floor,
                 const std::optional<IdArray>& exclude_indptr,
                 const std::optional<IdArray>& exclude_ids,
                 std::optional<IdArray>& above_ceiling, int n_threads,
                 const std::string& simd) {
  if (scores.ndim() != 2) throw py::value_error("scores must be 2-D (n_queries, n_docs)");
  if (vals.ndim() != 2 || ids.ndim() != 2 || vals.shape(0) != ids.shape(0) ||
      vals.shape(1) != ids.shape(1))
    throw py::value_error("vals and ids must be 2-D with the same shape (n_queries, k)");
  const int64_t q = scores.shape(0), b = scores.shape(1), k = vals.shape(1);
  if (vals.shape(0) != q) throw py::value_error("scores and the state must have the same rows");
  if (k < 1) throw py::value_error("k must be >= 1");
  if (offset < 0) throw py::value_error("offset must be >= 0");
  check_shape_1d(ceiling, "ceiling", q);
  check_shape_1d(floor, "floor", q);
  check_shape_1d(above_ceiling, "above_ceiling", q);
  if (exclude_indptr.has_value() != exclude_ids.has_value())
    throw py::value_error("exclude_indptr and exclude_ids go together");
  if (exclude_indptr) {
    check_shape_1d(exclude_indptr, "exclude_indptr", q + 1);
    if (exclude_ids->ndim() != 1) throw py::value_error("exclude_ids must be 1-D");
    const int64_t* p = exclude_indptr->data();
    if (p[0] != 0 || p[q] != exclude_ids->shape(0))
      throw py::value_error("exclude_indptr must start at 0 and end at len(exclude_ids)");
    for (int64_t i = 0; i < q; ++i)
      if (p[i + 1] < p[i]) throw py::value_error("exclude_indptr must be non-decreasing");
  }
  for (const auto* bound : {&ceiling, &floor})
    if (*bound)
      for (int64_t i = 0; i < q; ++i)
        if ((*bound)->data()[i] != (*bound)->data()[i])
          throw py::value_error("ceiling and floor must not contain NaN");
  if (q == 0 || b == 0) return;

  // Everything Python is resolved here, with the GIL held.
  const Block blk{scores.data(), q, b, offset, k, vals.data(), ids.data(),
                  data_or_null(ceiling), data_or_null(floor), data_or_null(exclude_indptr),
                  data_or_null(exclude_ids), &simd_named(simd)};
  float* state_vals = vals.mutable_data();
  int64_t* state_ids = ids.mutable_data();
  int64_t* above_out = above_ceiling ? above_ceiling->mutable_data() : nullptr;
  const bool count_above = above_out != nullptr && blk.ceiling != nullptr;
  std::vector<float> staged_vals(static_cast<std::size_t>(q * k));
  std::vector<int64_t> staged_ids(static_cast<std::size_t>(q * k));
  std::vector<uint8_t> changed(static_cast<std::size_t>(q), 0);
  std::vector<int64_t> above(static_cast<std::size_t>(q), 0);
  const Staged out{staged_vals.data(), staged_ids.data(), changed.data(), above.data()};
  std::atomic<int64_t> nan_at{-1};  // row * b + column of a NaN

  {
    py::gil_scoped_release release;
    const int threads = threads_for(q, q * b, n_threads);
    parallel_rows(q, rows_per_task(q, b, threads), threads, [&](int64_t begin, int64_t end) {
      RowScan scratch(static_cast<std::size_t>(k));
      for (int64_t i = begin; i < end && nan_at.load(std::memory_order_relaxed) < 0; ++i) {
        const int64_t col = count_above ? scan_row<true>(blk, i, scratch, out)
                                        : scan_row<false>(blk, i, scratch, out);
        if (col >= 0) {
          int64_t none = -1;
          nan_at.compare_exchange_strong(none, i * b + col);
        }
      }
    });
    if (nan_at.load() < 0) {  // commit: only now does the state change
      for (int64_t i = 0; i < q; ++i) {
        if (changed[i]) {
          std::memcpy(state_vals + i * k, staged_vals.data() + i * k, sizeof(float) * k);
          std::memcpy(state_ids + i * k, staged_ids.data() + i * k, sizeof(int64_t) * k);
        }
        if (count_above) above_out[i] += above[i];
      }
    }
  }
  const int64_t at = nan_at.load();
  if (at >= 0) {
    const int64_t row = at / b, col = at % b;
    throw py::value_error("scores contains NaN at row " + std::to_string(row) + ", column " +
                          std::to_string(col) + " (document id " + std::to_string(offset + col) +
                          ")");
  }
}

py::tuple merge_topk(const FloatArray& vals, const IdArray& ids, int64_t k, int n_threads) {
  if (vals.ndim() != 2 || ids.ndim() != 2 || vals.shape(0) != ids.shape(0) ||
      vals.shape(1) != ids.shape(1))
    throw py::value_error("vals and ids must be 2-D with the same shape (n_queries, n_entries)");
  if (k < 1) throw py::value_error("k must be >= 1");
  const int64_t q = vals.shape(0), n = vals.shape(1);
  FloatArray out_vals({q, k});  // outputs allocated with the GIL held
  IdArray out_ids({q, k});
  const float* v = vals.data();
  const int64_t* d = ids.data();
  float* ov = out_vals.mutable_data();
  int64_t* od = out_ids.mutable_data();
  std::atomic<int64_t> nan_at{-1};
  {
    py::gil_scoped_release release;
    const int threads = threads_for(q, q * std::max<int64_t>(n, k), n_threads);
    parallel_rows(q, rows_per_task(q, n, threads), threads, [&](int64_t begin, int64_t end) {
      TopK top(static_cast<std::size_t>(k));
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          const Entry e{v[i * n + j], d[i * n + j]};
          if (e.v != e.v) {
            int64_t none = -1;
            nan_at.compare_exchange_strong(none, i * n + j);
            return;
          }
          if (e.id < 0 || e.v == -kInf) continue;  // padding
          if (!top.full() || better(e, top.worst())) top.push(e);
        }
        top.store(ov + i * k, od + i * k);
        top.clear();
      }
    });
  }
  const int64_t at = nan_at.load();
  if (at >= 0)
    throw py::value_error("vals contains NaN at row " + std::to_string(at / n) + ", column " +
                          std::to_string(at % n));
  return py::make_tuple(out_vals, out_ids);
}

// dot(a, b) over d floats with eight independent sums (the compiler keeps them in vector registers).
inline float dot8(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] += a[j + t] * b[j + t];
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < d; ++j) sum += a[j] * b[j];
  return sum;
}

// out[i, c] = max over the positives p of row i of docs[cand[i, c]] . docs[p]; -inf where cand < 0
// or the row has no positives. Reads each candidate row once per positive, no gathered copy.
FloatArray candidate_similarity(const FloatArray& docs, const IdArray& cand, const IdArray& pos_indptr,
                                const IdArray& pos_ids, int n_threads) {
  if (docs.ndim() != 2) throw py::value_error("docs must be 2-D (n_docs, dim)");
  if (cand.ndim() != 2) throw py::value_error("candidates must be 2-D (n_queries, k)");
  const int64_t n = docs.shape(0), d = docs.shape(1), q = cand.shape(0), k = cand.shape(1);
  if (pos_indptr.ndim() != 1 || pos_indptr.shape(0) != q + 1)
    throw py::value_error("pos_indptr must have shape (" + std::to_string(q + 1) + ",)");
  if (pos_ids.ndim() != 1) throw py::value_error("pos_ids must be 1-D");
  const int64_t* ptr = pos_indptr.data();
  const int64_t* pid = pos_ids.data();
  const int64_t* cid = cand.data();
  if (q > 0 && (ptr[0] != 0 || ptr[q] != pos_ids.shape(0)))
    throw py::value_error("pos_indptr must start at 0 and end at len(pos_ids)");
  for (int64_t i = 0; i < q; ++i)
    if (ptr[i + 1] < ptr[i]) throw py::value_error("pos_indptr must be non-decreasing");
  for (int64_t j = 0; j < pos_ids.shape(0); ++j)
    if (pid[j] < 0 || pid[j] >= n)
      throw py::value_error("pos_ids[" + std::to_string(j) + "] = " + std::to_string(pid[j]) +
                            " is outside the corpus (0.." + std::to_string(n - 1) + ")");
  for (int64_t j = 0; j < q * k; ++j)
    if (cid[j] >= n)
      throw py::value_error("candidate id " + std::to_string(cid[j]) + " is outside the corpus (0.." +
                            std::to_string(n - 1) + ")");
  FloatArray out({q, k});
  float* o = out.mutable_data();
  const float* x = docs.data();
  {
    py::gil_scoped_release release;
    const int threads = threads_for(q, q * k * d, n_threads);
    parallel_rows(q, rows_per_task(q, k * d, threads), threads, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t c = 0; c < k; ++c) {
          float best = -kInf;
          const int64_t doc = cid[i * k + c];
          if (doc >= 0)
            for (int64_t p = ptr[i]; p < ptr[i + 1]; ++p)
              best = std::max(best, dot8(x + doc * d, x + pid[p] * d, d));
          o[i * k + c] = best;
        }
      }
    });
  }
  return out;
}

// ---- same-text normalisation ------------------------------------------------------------------
//
// fold_whitespace: a list of str, already case-folded except for ASCII A-Z. Each becomes the UTF-8 of its
// words, ASCII lower-cased, joined by one space: the bytes of Python's " ".join(text.split()) with A-Z
// lowered. Whitespace is exactly what str.split() splits on (checked
// against Python for every code point in the tests): ASCII 9-13, 28-32 and U+0085, U+00A0, U+1680,
// U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000. Continuation bytes (0x80-0xBF) never match a
// whitespace lead byte, and ASCII bytes never occur inside a multi-byte character, so a byte loop is
// safe on any valid UTF-8 (surrogates passed through as 3-byte sequences included).

inline int whitespace_bytes(const unsigned char* p, const unsigned char* end) {
  const unsigned char c = p[0];
  if (c < 0x80) return (c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x1f)) ? 1 : 0;
  const std::ptrdiff_t left = end - p;
  if (c == 0xC2 && left >= 2) return (p[1] == 0x85 || p[1] == 0xA0) ? 2 : 0;
  if (left < 3) return 0;
  if (c == 0xE1) return (p[1] == 0x9A && p[2] == 0x80) ? 3 : 0;
  if (c == 0xE2) {
    if (p[1] == 0x80) return ((p[2] >= 0x80 && p[2] <= 0x8A) || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF) ? 3 : 0;
    return (p[1] == 0x81 && p[2] == 0x9F) ? 3 : 0;
  }
  if (c == 0xE3) return (p[1] == 0x80 && p[2] == 0x80) ? 3 : 0;
  return 0;
}

py::tuple fold_whitespace(const py::list& texts) {
  // The UTF-8 bytes of every text, without copies where Python already holds them: an ASCII str is its
  // own UTF-8, another str caches its UTF-8 on first request; lone surrogates (which strict UTF-8
  // refuses) are encoded with surrogatepass into a bytes object kept alive here.
  const auto n = static_cast<int64_t>(texts.size());
  std::vector<std::pair<const unsigned char*, Py_ssize_t>> spans(static_cast<size_t>(n));
  std::vector<py::object> keep;
  Py_ssize_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(texts.ptr(), i);
    const char* raw = nullptr;
    Py_ssize_t len = 0;
    if (PyUnicode_Check(item) && PyUnicode_IS_ASCII(item)) {
      raw = static_cast<const char*>(PyUnicode_DATA(item));
      len = PyUnicode_GET_LENGTH(item);
    } else if (PyUnicode_Check(item)) {
      raw = PyUnicode_AsUTF8AndSize(item, &len);
      if (raw == nullptr) {
        PyErr_Clear();
        PyObject* encoded = PyUnicode_AsEncodedString(item, "utf-8", "surrogatepass");
        if (encoded == nullptr) throw py::error_already_set();
        keep.push_back(py::reinterpret_steal<py::object>(encoded));
        raw = PyBytes_AS_STRING(encoded);
        len = PyBytes_GET_SIZE(encoded);
      }
    } else {
      throw py::type_error("fold_whitespace takes a list of str; item " + std::to_string(i) + " is " +
                           std::string(Py_TYPE(item)->tp_name));
    }
    spans[static_cast<size_t>(i)] = {reinterpret_cast<const unsigned char*>(raw), len};
    size += len;
  }
  std::string out(static_cast<size_t>(size), '\0');  // never longer than the input
  IdArray out_off(n + 1);
  int64_t* w_off = out_off.mutable_data();
  {
    py::gil_scoped_release release;
    size_t w = 0;
    for (int64_t i = 0; i < n; ++i) {
      w_off[i] = static_cast<int64_t>(w);
      const unsigned char* p = spans[static_cast<size_t>(i)].first;
      const unsigned char* end = p + spans[static_cast<size_t>(i)].second;
      bool pending = false, any = false;
      while (p < end) {
#ifdef MINER_TOPK_SSE2
        // Prose, 16 bytes at a time: printable ASCII with single spaces between words copies through with
        // A-Z lowered. A chunk that starts with a space, holds two in a row or any other byte (controls,
        // non-ASCII) goes to the byte loop; a trailing space is left for the next round, which decides
        // whether it is the last of a run. Output never outgrows the input read so far, so the 16-byte
        // store stays inside `out`.
        while (end - p >= 16) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
          const __m128i odd = _mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20)),  // controls, >= 0x80
                                           _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7F)));
          const unsigned spaces = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(' '))));
          if (_mm_movemask_epi8(odd) != 0 || (spaces & 1u) || (spaces & (spaces >> 1))) break;
          const int take = (spaces & 0x8000u) ? 15 : 16;
          const __m128i upper = _mm_and_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8('A' - 1)),
                                              _mm_cmplt_epi8(v, _mm_set1_epi8('Z' + 1)));
          if (pending) {
            out[w++] = ' ';
            pending = false;
          }
          _mm_storeu_si128(reinterpret_cast<__m128i*>(&out[w]),
                           _mm_add_epi8(v, _mm_and_si128(upper, _mm_set1_epi8(32))));
          w += static_cast<size_t>(take);
          p += take;
          any = true;
        }
        if (p >= end) break;
#endif
        const int ws = whitespace_bytes(p, end);
        if (ws) {
          pending = any;
          p += ws;
          continue;
        }
        if (pending) {
          out[w++] = ' ';
          pending = false;
        }
        const unsigned char c = *p++;
        out[w++] = static_cast<char>((c >= 'A' && c <= 'Z') ? c + 32 : c);
        any = true;
      }
    }
    w_off[n] = static_cast<int64_t>(w);
    out.resize(w);
  }
  return py::make_tuple(py::bytes(out), out_off);
}

}  // namespace

PYBIND11_MODULE(_topk, m) {
  m.doc() = "Private top-k kernel behind miner.topk; call miner.topk, not this module.";
  m.def("update_topk", &update_topk, py::arg("scores").noconvert(), py::arg("offset"),
        py::arg("vals").noconvert(), py::arg("ids").noconvert(),
        py::arg("ceiling").noconvert() = py::none(), py::arg("floor").noconvert() = py::none(),
        py::arg("exclude_indptr").noconvert() = py::none(),
        py::arg("exclude_ids").noconvert() = py::none(),
        py::arg("above_ceiling").noconvert() = py::none(), py::arg("n_threads") = 1,
        py::arg("simd") = "auto",
        "Stream scores[q, b] (column j = document offset + j) into the top-k state in place.");
  m.def("merge_topk", &merge_topk, py::arg("vals").noconvert(), py::arg("ids").noconvert(),
        py::arg("k"), py::arg("n_threads") = 1,
        "The k best entries of each row of (vals, ids) -> (vals[q, k], ids[q, k]).");
  m.def("candidate_similarity", &candidate_similarity, py::arg("docs").noconvert(),
        py::arg("candidates").noconvert(), py::arg("pos_indptr").noconvert(),
        py::arg("pos_ids").noconvert(), py::arg("n_threads") = 1,
        "max over each row's positives of docs[candidate] . docs[positive] -> float32[q, k].");
  m.def("fold_whitespace", &fold_whitespace, py::arg("texts"),
        "list of str -> (UTF-8 of each one's words, ASCII lower-cased, joined by one space, back to back; "
        "offsets int64[n + 1]).");
  m.def(
      "simd",
      []() {
        std::vector<std::string> names;
        for (const auto& simd : simd_available()) names.push_back(simd.name);
        return names;
      },
      "Instruction sets the scan can use on this CPU, the default first.");
}
