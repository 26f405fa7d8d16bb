// The payload codec in C++: the same bytes as sparsefl/codec.py's Python encoder (the
// reference; its docstring holds the byte layout), and a decoder with the same checks.
//
// Encode, per tensor: one pass over the indices computes the size of every candidate
// index encoding -- int32 list (4 B/entry), LEB128 varints of the gaps (the varint length
// of each gap), Golomb-Rice (for each candidate parameter b: 5 + ceil(sum(g >> b) + k)/8
// + ceil(k*b/8) bytes, from the gap sum and the sums of g >> b), bitmask over numel,
// bitmask over a reference support (a merge walk checks the support lies inside it) --
// then writes only the smallest, with the format's tie rule (codec.py: among equal
// sizes the first of int32 list, varint, Rice, bitmask, reference bitmask; among Rice
// parameters of equal size the smallest b).  Values are converted with torch's
// rounding and copied.  A section of 2^32 bytes or more is refused (its length field
// is a u32), never wrapped.  The
// CRC-32 is zlib's: computed here over byte ranges in parallel and joined with
// crc32_combine when the build found zlib (SPARSEFL_HAVE_ZLIB), else appended in Python.
//
// Decode: every field, size, range and order is checked before it is used; a malformed
// payload raises ValueError (codec.py turns it into PayloadError).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(SPARSEFL_HAVE_ZLIB)
#include <zlib.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace sparsefl {
namespace {

constexpr int kInt32 = 0, kVarint = 1, kBitmask = 2, kDense = 3, kRef = 4, kRice = 5;
constexpr int64_t kHeader = 24, kRecord = 24, kRiceHead = 5;
constexpr uint64_t kMaxNumel = uint64_t{1} << 40;

at::ScalarType value_type(int64_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kHalf;
    case 2: return at::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "unknown value dtype code ", code);
  }
}

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// ------------------------------------------------------------------ checksum --------

bool crc_builtin() {
#if defined(SPARSEFL_HAVE_ZLIB)
  return true;
#else
  return false;
#endif
}

// zlib's CRC-32 of p[0, n): pieces on the ATen threads, joined in order.  zlib's
// length argument is 32-bit (uInt): each piece is fed in runs of at most 1 GiB, so a
// payload over 4 GiB is checksummed whole at any thread count.
uint32_t crc32_parallel(const uint8_t* p, int64_t n) {
#if defined(SPARSEFL_HAVE_ZLIB)
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n >> 16));
  std::vector<uLong> part(nt);
  std::vector<int64_t> cut(nt + 1);
  for (int64_t t = 0; t <= nt; ++t) cut[t] = n * t / nt;
  constexpr int64_t kRun = int64_t{1} << 30;
  at::parallel_for(0, nt, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      uLong c = crc32(0L, Z_NULL, 0);
      for (int64_t a = cut[t]; a < cut[t + 1]; a += kRun)
        c = crc32(c, p + a, static_cast<uInt>(std::min(kRun, cut[t + 1] - a)));
      part[t] = c;
    }
  });
  uLong crc = part[0];
  for (int64_t t = 1; t < nt; ++t) crc = crc32_combine(crc, part[t], cut[t + 1] - cut[t]);
  return static_cast<uint32_t>(crc);
#else
  (void)p, (void)n;
  TORCH_CHECK(false, "codec: built without zlib");
#endif
}

// ------------------------------------------------------------------ encode ----------

// Runs fn(i) for i in [0, n) on the ATen threads, the items dealt out longest first to
// the least loaded thread (a model's tensors differ in size by 10^4: an even split of
// the index range would leave one thread with the big ones).
template <typename F>
void parallel_items(const std::vector<int64_t>& work, F fn) {
  const int64_t n = static_cast<int64_t>(work.size());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  std::vector<std::vector<int64_t>> mine(nt);
  std::vector<int64_t> load(nt, 0);
  for (int64_t i : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    mine[t].push_back(i);
    load[t] += work[i] + 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t i : mine[t]) fn(i);
  });
}

struct Choice {
  int enc;
  int64_t size;
  int rice_b;
};

// The Rice candidates {b0 - 1, b0, b0 + 1}, ascending: the first of equal size wins,
// so a tie goes to the smallest b (the format's rule).
std::vector<int> rice_candidates(int b0) {
  std::vector<int> cand;
  for (int b : {std::max(0, b0 - 1), b0, std::min(40, b0 + 1)})
    if (std::find(cand.begin(), cand.end(), b) == cand.end()) cand.push_back(b);
  std::sort(cand.begin(), cand.end());
  return cand;
}

// The encoding choice from sizes alone, in one pass over the indices, which also checks
// them (strictly ascending in [0, n)): returns false if they are not.
bool choose(const int64_t* idx, int64_t k, int64_t n, const int64_t* ref, int64_t nref,
            bool has_ref, Choice& out) {
  if (k && (idx[0] < 0 || idx[k - 1] >= n)) return false;
  if (k == n) {  // ascending in [0, n) with n entries: exactly 0..n-1
    for (int64_t i = 1; i < k; ++i)
      if (idx[i] <= idx[i - 1]) return false;
    out = {kDense, 0, 0};
    return true;
  }
  // The gap sum telescopes to idx[k-1] + 1 - k (gaps g_i = idx_i - idx_{i-1} - 1), so
  // numpy's float64 mean of the gaps (exact: partial sums are integers below 2^53) and
  // with it the Rice candidates are known before the pass.
  const double mean = k ? static_cast<double>(idx[k - 1] + 1 - k) / static_cast<double>(k) : 0;
  const int b0 = std::max(0, static_cast<int>(std::floor(std::log2(std::max(mean * 0.69, 1.0)))));
  const std::vector<int> cand = rice_candidates(b0);
  const int nc = static_cast<int>(cand.size());
  const int b_0 = cand[0], b_1 = nc > 1 ? cand[1] : cand[0], b_2 = nc > 2 ? cand[2] : cand[0];
  int64_t var_bytes = 0, q0 = 0, q1 = 0, q2 = 0, prev = -1;
  bool ok = true;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t d = idx[i] - prev;
    ok &= d > 0;
    const uint64_t g = static_cast<uint64_t>(d - 1);
    prev = idx[i];
    var_bytes += 1 + (63 - __builtin_clzll(g | 1)) / 7;  // LEB128 bytes of g
    q0 += static_cast<int64_t>(g >> b_0);
    q1 += static_cast<int64_t>(g >> b_1);
    q2 += static_cast<int64_t>(g >> b_2);
  }
  if (!ok) return false;
  std::vector<Choice> opts;  // in the reference's insertion order
  if (n < (int64_t{1} << 31)) opts.push_back({kInt32, 4 * k, 0});
  opts.push_back({kVarint, var_bytes, 0});
  if (k) {
    const int64_t qs[3] = {q0, q1, q2};
    Choice best{kRice, std::numeric_limits<int64_t>::max(), 0};
    for (int c = 0; c < nc; ++c) {
      const int64_t size = kRiceHead + (qs[c] + k + 7) / 8 + (k * cand[c] + 7) / 8;
      if (size < best.size) best = {kRice, size, cand[c]};
    }
    opts.push_back(best);
  }
  if (n <= 64 * std::max<int64_t>(k, 1) || n < 4096) opts.push_back({kBitmask, (n + 7) / 8, 0});
  if (has_ref) {
    int64_t inside = 0, p = 0;
    for (int64_t i = 0; i < k; ++i) {  // merge walk: idx and ref both ascending
      while (p < nref && ref[p] < idx[i]) ++p;
      if (p < nref && ref[p] == idx[i]) ++inside;
    }
    if (inside == k) opts.push_back({kRef, (nref + 7) / 8, 0});
  }
  out = opts[0];
  for (const Choice& c : opts)
    if (c.size < out.size) out = c;  // strict: the first smallest wins, as min()
  return true;
}

// Appends `nbits` (<= 57) low bits of v to a little-endian bit stream.
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int n = 0;
  void put(uint64_t v, int nbits) {
    acc |= v << n;
    n += nbits;
    while (n >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      n -= 8;
    }
  }
  void flush() {
    if (n) *out++ = static_cast<uint8_t>(acc);
  }
};

void write_section(uint8_t* o, const Choice& c, const int64_t* idx, int64_t k, int64_t n,
                   const int64_t* ref, int64_t nref) {
  std::memset(o, 0, c.size);
  switch (c.enc) {
    case kDense: return;
    case kInt32:
      for (int64_t i = 0; i < k; ++i) {
        const int32_t v = static_cast<int32_t>(idx[i]);
        std::memcpy(o + 4 * i, &v, 4);
      }
      return;
    case kVarint: {
      int64_t prev = -1;
      for (int64_t i = 0; i < k; ++i) {
        uint64_t g = static_cast<uint64_t>(idx[i] - prev - 1);
        prev = idx[i];
        while (g >= 0x80) {
          *o++ = static_cast<uint8_t>((g & 0x7f) | 0x80);
          g >>= 7;
        }
        *o++ = static_cast<uint8_t>(g);
      }
      return;
    }
    case kRice: {
      const int b = c.rice_b;
      const int64_t rbytes = (k * b + 7) / 8;
      const int64_t qbytes = c.size - kRiceHead - rbytes;
      o[0] = static_cast<uint8_t>(b);
      const uint32_t q32 = static_cast<uint32_t>(qbytes);
      std::memcpy(o + 1, &q32, 4);
      uint8_t* q = o + kRiceHead;
      BitWriter r{q + qbytes};
      const uint64_t mask = b ? (uint64_t{1} << b) - 1 : 0;
      int64_t qpos = -1, prev = -1;
      for (int64_t i = 0; i < k; ++i) {
        const uint64_t g = static_cast<uint64_t>(idx[i] - prev - 1);
        prev = idx[i];
        qpos += static_cast<int64_t>(g >> b) + 1;  // q zeros, then the terminating one
        q[qpos >> 3] |= static_cast<uint8_t>(1u << (qpos & 7));
        if (b) r.put(g & mask, b);
      }
      r.flush();
      return;
    }
    case kBitmask:
      for (int64_t i = 0; i < k; ++i) o[idx[i] >> 3] |= static_cast<uint8_t>(1u << (idx[i] & 7));
      return;
    case kRef: {
      int64_t p = 0;
      for (int64_t i = 0; i < k; ++i) {
        while (ref[p] < idx[i]) ++p;  // inside the support: checked by choose()
        o[p >> 3] |= static_cast<uint8_t>(1u << (p & 7));
      }
      return;
    }
  }
}

// header + body + 4 zero bytes for the CRC-32 (written by the caller: zlib's).
at::Tensor codec_encode_body(at::TensorList indices, at::TensorList values,
                             at::IntArrayRef numels,
                             c10::List<c10::optional<at::Tensor>> reference,
                             int64_t value_code) {
  const int64_t T = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == T &&
                        static_cast<int64_t>(numels.size()) == T,
                    "codec: indices, values and numels differ in length");
  TORCH_CHECK_VALUE(reference.size() == 0 || static_cast<int64_t>(reference.size()) == T,
                    "reference has ", reference.size(), " entries for ", T, " chunks");
  const at::ScalarType vt = value_type(value_code);
  const int64_t vsize = vt == at::kFloat ? 4 : 2;
  std::vector<at::Tensor> idx64(T), vals(T), refs(T);
  for (int64_t i = 0; i < T; ++i) {  // shapes and dtypes; tensors as the kernels read them
    const at::Tensor& it = indices[i];
    const at::Tensor& vv = values[i];
    const int64_t n = numels[i];
    TORCH_CHECK_VALUE(it.dim() == 1 && vv.dim() == 1 && it.numel() == vv.numel(), "chunk ", i,
                      ": indices and values must be 1-D of equal length");
    TORCH_CHECK_VALUE(n >= 0 && static_cast<uint64_t>(n) < kMaxNumel, "chunk ", i,
                      ": numel ", n, " outside [0, 2^40)");
    TORCH_CHECK_VALUE(it.numel() == 0 || it.scalar_type() == at::kLong ||
                          it.scalar_type() == at::kInt,
                      "chunk ", i, ": indices must be int64/int32, got ", it.scalar_type());
    idx64[i] = it.numel() ? it.to(at::kCPU, at::kLong).contiguous() : at::empty({0}, at::kLong);
    vals[i] = vv.detach().to(at::kCPU, vt).contiguous();  // torch's (vectorised) rounding
    if (reference.size() && reference.get(i).has_value())
      refs[i] = reference.get(i)->to(at::kCPU, at::kLong).contiguous();
  }
  // phase 1, chunks in parallel: order check and the encoding choice (sizes only)
  std::vector<Choice> choice(T);
  std::vector<int64_t> work(T);
  for (int64_t i = 0; i < T; ++i) work[i] = idx64[i].numel();
  parallel_items(work, [&](int64_t i) {
    const bool has_ref = refs[i].defined();
    const bool ok = choose(idx64[i].data_ptr<int64_t>(), idx64[i].numel(), numels[i],
                           has_ref ? refs[i].data_ptr<int64_t>() : nullptr,
                           has_ref ? refs[i].numel() : 0, has_ref, choice[i]);
    TORCH_CHECK_VALUE(ok, "chunk ", i, ": indices must be strictly ascending in [0, numel)");
  });
  std::vector<int64_t> at_(T + 1, kHeader);
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK_VALUE(choice[i].size < (int64_t{1} << 32), "chunk ", i, ": its index "
                      "section would be ", choice[i].size, " bytes; a payload section holds "
                      "under 2^32 (send the tensor in pieces)");
    at_[i + 1] = at_[i] + kRecord + choice[i].size + idx64[i].numel() * vsize;
  }
  at::Tensor res = at::empty({at_[T] + 4}, at::kByte);
  uint8_t* out = res.data_ptr<uint8_t>();
  // phase 2, chunks in parallel: record, index section, values, each at its offset
  parallel_items(work, [&](int64_t i) {
    {
      uint8_t* o = out + at_[i];
      const int64_t k = idx64[i].numel();
      const uint64_t n = static_cast<uint64_t>(numels[i]), kk = static_cast<uint64_t>(k);
      const uint32_t len = static_cast<uint32_t>(choice[i].size);
      std::memcpy(o, &n, 8);
      std::memcpy(o + 8, &kk, 8);
      o[16] = static_cast<uint8_t>(choice[i].enc);
      o[17] = o[18] = o[19] = 0;
      std::memcpy(o + 20, &len, 4);
      const bool has_ref = refs[i].defined();
      write_section(o + kRecord, choice[i], idx64[i].data_ptr<int64_t>(), k, numels[i],
                    has_ref ? refs[i].data_ptr<int64_t>() : nullptr,
                    has_ref ? refs[i].numel() : 0);
      if (k) std::memcpy(o + kRecord + choice[i].size, vals[i].data_ptr(), k * vsize);
    }
  });
  // header: magic, version, flags, n_tensors, value dtype, reserved, body length
  std::memcpy(out, "SFLP", 4);
  const uint16_t version = 1, flags = 0;
  const uint32_t nt = static_cast<uint32_t>(T);
  const uint64_t body = at_[T] - kHeader;
  std::memcpy(out + 4, &version, 2);
  std::memcpy(out + 6, &flags, 2);
  std::memcpy(out + 8, &nt, 4);
  out[12] = static_cast<uint8_t>(value_code);
  out[13] = out[14] = out[15] = 0;
  std::memcpy(out + 16, &body, 8);
  std::memset(out + at_[T], 0, 4);
  if (crc_builtin()) {
    const uint32_t crc = crc32_parallel(out, at_[T]);
    std::memcpy(out + at_[T], &crc, 4);
  }
  return res;
}

// ------------------------------------------------------------------ decode ----------

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  TORCH_CHECK_VALUE(false, where, ": ", what);
  throw;  // unreachable
}

// idx[0..k) strictly ascending in [0, numel)
bool ascending_in(const int64_t* idx, int64_t k, int64_t numel) {
  bool ok = k == 0 || (idx[0] >= 0 && idx[k - 1] < numel);
  for (int64_t q = 1; q < k && ok; ++q) ok = idx[q] > idx[q - 1];
  return ok;
}

void check_ascending(const int64_t* idx, int64_t k, int64_t numel, const std::string& where) {
  if (!ascending_in(idx, k, numel)) bad(where, "indices are not strictly ascending in [0, " + std::to_string(numel) + ")");
}

// Indices of one tensor from its section (size already bounded by the payload).
at::Tensor decode_indices(const uint8_t* s, int64_t len, int enc, int64_t numel, int64_t nnz,
                          const c10::optional<at::Tensor>& ref, const std::string& where) {
  at::Tensor out = at::empty({nnz}, at::kLong);
  int64_t* idx = out.data_ptr<int64_t>();
  if (enc == kDense) {
    if (len != 0 || nnz != numel) bad(where, "dense encoding needs nnz == numel and no index bytes");
    for (int64_t i = 0; i < nnz; ++i) idx[i] = i;
    return out;
  }
  if (enc == kInt32) {
    if (len != 4 * nnz || numel >= (int64_t{1} << 31))
      bad(where, "int32 index section of " + std::to_string(len) + " bytes for " +
                     std::to_string(nnz) + " entries (numel " + std::to_string(numel) + ")");
    for (int64_t i = 0; i < nnz; ++i) idx[i] = get<int32_t>(s + 4 * i);
    check_ascending(idx, nnz, numel, where);  // the only form not ascending by construction
  } else if (enc == kVarint || enc == kRice) {
    uint64_t* gaps = reinterpret_cast<uint64_t*>(idx);  // gaps first, indices in place
    if (enc == kVarint) {
      int64_t pos = 0;
      for (int64_t i = 0; i < nnz; ++i) {
        uint64_t g = 0;
        int len_i = 0;
        while (true) {
          if (pos >= len) bad(where, "index section ends mid-varint or holds too few varints");
          const uint8_t byte = s[pos++];
          if (len_i == 9) bad(where, "varint longer than 9 bytes");
          g |= static_cast<uint64_t>(byte & 0x7f) << (7 * len_i);
          ++len_i;
          if (byte < 0x80) {
            if (len_i > 1 && byte == 0) bad(where, "overlong varint (a redundant zero byte)");
            break;
          }
        }
        gaps[i] = g;
      }
      if (pos != len) bad(where, "index section holds more bytes than " + std::to_string(nnz) + " varints");
    } else {
      if (len < kRiceHead) bad(where, "Rice section shorter than its header");
      const int b = s[0];
      const int64_t qlen = get<uint32_t>(s + 1);
      if (b > 40) bad(where, "Rice parameter " + std::to_string(b) + " > 40");
      const int64_t rlen = (nnz * b + 7) / 8;
      if (len != kRiceHead + qlen + rlen)
        bad(where, "Rice section of " + std::to_string(len) + " bytes, expected " +
                       std::to_string(kRiceHead + qlen + rlen));
      const uint8_t* q = s + kRiceHead;
      const uint8_t* r = q + qlen;
      // quotients: the set bits of the stream, found a byte at a time (ctz)
      int64_t found = 0, last = -1;
      const int64_t qmax = (int64_t{1} << 40) >> b;
      for (int64_t byte = 0; byte < qlen; ++byte) {
        unsigned m = q[byte];
        while (m) {
          const int64_t bit = 8 * byte + __builtin_ctz(m);
          m &= m - 1;
          if (found == nnz) bad(where, "more Rice quotients than " + std::to_string(nnz));
          const int64_t zeros = bit - last - 1;
          if (zeros >= qmax) bad(where, "Rice quotient out of range");
          gaps[found++] = static_cast<uint64_t>(zeros) << b;
          last = bit;
        }
      }
      if (found != nnz)
        bad(where, std::to_string(found) + " Rice quotients, expected " + std::to_string(nnz));
      if (nnz == 0 && qlen) bad(where, "Rice quotient bytes for 0 entries");
      if (nnz && 8 * qlen - last - 1 >= 8) bad(where, "Rice quotient stream has trailing bytes");
      if (b) {  // remainders: b bits each, LSB first, through a 64-bit window
        const uint64_t mask = (uint64_t{1} << b) - 1;
        uint64_t acc = 0;
        int have = 0;
        int64_t byte = 0;
        for (int64_t i = 0; i < nnz; ++i) {
          while (have < b) {
            acc |= static_cast<uint64_t>(r[byte++]) << have;
            have += 8;
          }
          gaps[i] |= acc & mask;
          acc >>= b;
          have -= b;
        }
        if (acc) bad(where, "Rice remainder padding bits are set");  // rest of last byte
      }
    }
    int64_t prev = -1;
    for (int64_t i = 0; i < nnz; ++i) {  // guarded cumulative sum
      if (gaps[i] >= static_cast<uint64_t>(numel) ||
          static_cast<int64_t>(gaps[i]) >= numel - prev - 1)
        bad(where, "index gaps run past numel " + std::to_string(numel));
      prev = prev + static_cast<int64_t>(gaps[i]) + 1;
      idx[i] = prev;
    }
  } else {  // bitmask over numel, or over the reference's support
    const int64_t* r = nullptr;
    int64_t space = numel;
    at::Tensor r64;
    if (enc == kRef) {
      r64 = ref->to(at::kCPU, at::kLong).contiguous();
      r = r64.data_ptr<int64_t>();
      space = r64.numel();
    }
    if (len != (space + 7) / 8)
      bad(where, "bitmask of " + std::to_string(len) + " bytes for " + std::to_string(space) + " bits");
    for (int64_t bit = space; bit < 8 * len; ++bit)
      if ((s[bit >> 3] >> (bit & 7)) & 1) bad(where, "bitmask padding bits are set");
    int64_t set = 0;
    for (int64_t byte = 0; byte < len; ++byte) set += __builtin_popcount(s[byte]);
    if (set != nnz)
      bad(where, "bitmask has " + std::to_string(set) + " bits set, header says " + std::to_string(nnz));
    if (r) {
      if (!ascending_in(r, space, numel)) bad(where, "the reference support is not ascending in [0, " + std::to_string(numel) + ")");
    }
    int64_t k = 0;
    for (int64_t byte = 0; byte < len; ++byte) {
      unsigned m = s[byte];
      while (m) {
        const int64_t bit = 8 * byte + __builtin_ctz(m);
        idx[k++] = r ? r[bit] : bit;
        m &= m - 1;
      }
    }
  }
  return out;  // varint/Rice: guarded sums; bitmasks: set bits in order -- ascending
}

struct Rec {
  int64_t numel, nnz, section, len, values;
  int enc;
};

struct Parsed {
  const uint8_t* p;
  std::vector<Rec> recs;
  at::ScalarType vt;
  int64_t vsize;
};

// Header and records, in order: every field checked before it is used.
Parsed parse(const at::Tensor& data, const c10::List<c10::optional<at::Tensor>>& reference) {
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous() &&
                        data.device().is_cpu(),
                    "codec: the payload must be a contiguous 1-D uint8 CPU tensor");
  const uint8_t* p = data.data_ptr<uint8_t>();
  const int64_t size = data.numel();
  if (size < kHeader + 4) bad("payload", "shorter than header + checksum");
  if (std::memcmp(p, "SFLP", 4) != 0) bad("payload", "bad magic");
  if (get<uint16_t>(p + 4) != 1)
    bad("payload", "unsupported payload version " + std::to_string(get<uint16_t>(p + 4)));
  if (get<uint16_t>(p + 6) != 0 || p[13] || p[14] || p[15]) bad("payload", "reserved header bits are set");
  const uint32_t T = get<uint32_t>(p + 8);
  const int dt = p[12];
  if (dt > 2) bad("payload", "unknown value dtype code " + std::to_string(dt));
  const uint64_t body = get<uint64_t>(p + 16);
  if (body != static_cast<uint64_t>(size - kHeader - 4))
    bad("payload", "header says the body has " + std::to_string(body) +
                       " bytes, the payload holds " + std::to_string(size - kHeader - 4));
  if (reference.size() && reference.size() != T)
    bad("payload", "payload has " + std::to_string(T) + " tensors, reference has " +
                       std::to_string(reference.size()));
  if (crc_builtin() && get<uint32_t>(p + size - 4) != crc32_parallel(p, size - 4))
    bad("payload", "checksum mismatch: the payload was corrupted or truncated");
  Parsed out{p, {}, value_type(dt), dt == 0 ? 4 : 2};
  const int64_t end = size - 4;
  int64_t pos = kHeader;
  for (uint32_t t = 0; t < T; ++t) {
    const std::string where = "tensor " + std::to_string(t);
    if (pos + kRecord > end) bad(where, "record header runs past the end of the payload");
    const uint64_t numel = get<uint64_t>(p + pos), nnz = get<uint64_t>(p + pos + 8);
    const int enc = p[pos + 16];
    const bool pad = p[pos + 17] || p[pos + 18] || p[pos + 19];
    const int64_t idx_len = get<uint32_t>(p + pos + 20);
    pos += kRecord;
    if (numel >= kMaxNumel) bad(where, "numel " + std::to_string(numel) + " exceeds 2^40");
    if (nnz > numel)
      bad(where, std::to_string(nnz) + " entries for " + std::to_string(numel) + " elements");
    if (pad) bad(where, "reserved record bytes are set");
    if (enc > 5) bad(where, "unknown index encoding " + std::to_string(enc));
    if (pos + idx_len + static_cast<int64_t>(nnz) * out.vsize > end)
      bad(where, "index and value sections run past the end");
    if (enc == kRef && !(reference.size() && reference.get(t).has_value()))
      bad(where, "encoded against a reference support, but no reference was given to decode()");
    out.recs.push_back({static_cast<int64_t>(numel), static_cast<int64_t>(nnz), pos, idx_len,
                        pos + idx_len, enc});
    pos += idx_len + static_cast<int64_t>(nnz) * out.vsize;
  }
  if (pos != end)
    bad("payload", std::to_string(end - pos) + " unexpected bytes after the last tensor");
  return out;
}

void check_finite(const uint8_t* v, int64_t n, at::ScalarType vt, const std::string& where) {
  bool finite = true;
  if (vt == at::kFloat) {
    for (int64_t i = 0; i < n; ++i) {
      float x;
      std::memcpy(&x, v + 4 * i, 4);
      finite &= std::isfinite(x);
    }
  } else {  // half/bfloat16: the exponent field all ones is inf or NaN
    const uint16_t e = vt == at::kHalf ? 0x7c00 : 0x7f80;
    for (int64_t i = 0; i < n; ++i) {
      uint16_t x;
      std::memcpy(&x, v + 2 * i, 2);
      finite &= (x & e) != e;
    }
  }
  if (!finite) bad(where, "non-finite values (policy nonfinite='raise')");
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>> codec_decode(
    const at::Tensor& data, c10::List<c10::optional<at::Tensor>> reference, bool allow_nonfinite) {
  const Parsed ps = parse(data, reference);
  const int64_t T = static_cast<int64_t>(ps.recs.size());
  std::vector<at::Tensor> idxs(T), vals(T);
  std::vector<int64_t> numels(T), work(T);
  for (int64_t t = 0; t < T; ++t) work[t] = ps.recs[t].nnz;
  parallel_items(work, [&](int64_t t) {  // tensors in parallel
    {
      const Rec& r = ps.recs[t];
      const std::string where = "tensor " + std::to_string(t);
      c10::optional<at::Tensor> ref;
      if (r.enc == kRef) ref = reference.get(t);
      idxs[t] = decode_indices(ps.p + r.section, r.len, r.enc, r.numel, r.nnz, ref, where);
      if (!allow_nonfinite) check_finite(ps.p + r.values, r.nnz, ps.vt, where);
      at::Tensor v = at::empty({r.nnz}, ps.vt);
      if (r.nnz) std::memcpy(v.data_ptr(), ps.p + r.values, r.nnz * ps.vsize);
      vals[t] = v;
      numels[t] = r.numel;
    }
  });
  return {idxs, vals, numels};
}

// The payload straight into the tiled layout the server's merge reads
// (sparsefl/ops/tiled.py): tensor t's entries land at flat index starts[t] + i, as
// offsets of their 4096-element tile (int16) plus each tile's first entry (int32), values
// concatenated.  Tile starts inside a tensor are found while its entries are cut (tensors
// in parallel; their tiles do not overlap), those between tensors afterwards.
std::tuple<at::Tensor, at::Tensor, at::Tensor> codec_decode_tiled(
    const at::Tensor& data, c10::List<c10::optional<at::Tensor>> reference, bool allow_nonfinite,
    at::IntArrayRef starts, at::IntArrayRef numels, int64_t numel) {
  constexpr int64_t kTileBits = 12;
  const Parsed ps = parse(data, reference);
  const int64_t T = static_cast<int64_t>(ps.recs.size());
  if (static_cast<int64_t>(starts.size()) != T || static_cast<int64_t>(numels.size()) != T)
    bad("payload", "payload does not match the model layout (" + std::to_string(T) +
                       " tensors, expected " + std::to_string(numels.size()) + ")");
  for (int64_t t = 0; t < T; ++t)
    if (ps.recs[t].numel != numels[t])
      bad("payload", "payload does not match the model layout (tensor " + std::to_string(t) +
                         " has " + std::to_string(ps.recs[t].numel) + " elements, expected " +
                         std::to_string(numels[t]) + ")");
  std::vector<int64_t> at_(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t lo = starts[t], hi = lo + ps.recs[t].numel;
    TORCH_CHECK_VALUE(lo >= 0 && hi <= numel && (t == 0 || lo >= starts[t - 1] + ps.recs[t - 1].numel),
                      "codec: tensor ", t, " at [", lo, ", ", hi, ") is not inside [0, ", numel,
                      ") after the tensor before it");
    at_[t + 1] = at_[t] + ps.recs[t].nnz;
  }
  TORCH_CHECK_VALUE(at_[T] < (int64_t{1} << 31) - 1, "codec: a tiled payload holds fewer than 2^31 entries");
  const int64_t tiles = (numel + (1 << kTileBits) - 1) >> kTileBits;
  at::Tensor offsets = at::empty({tiles + 1}, at::kInt);
  at::Tensor local = at::empty({at_[T]}, at::kShort);
  at::Tensor values = at::empty({at_[T]}, ps.vt);
  int32_t* off = offsets.data_ptr<int32_t>();
  int16_t* loc = local.data_ptr<int16_t>();
  auto* val = static_cast<uint8_t*>(values.data_ptr());
  std::vector<int64_t> first(T, -1), last(T, -1);  // flat index of each tensor's ends
  std::vector<int64_t> work(T);
  for (int64_t t = 0; t < T; ++t) work[t] = ps.recs[t].nnz;
  parallel_items(work, [&](int64_t t) {
    {
      const Rec& r = ps.recs[t];
      const std::string where = "tensor " + std::to_string(t);
      c10::optional<at::Tensor> ref;
      if (r.enc == kRef) ref = reference.get(t);
      const at::Tensor idx = decode_indices(ps.p + r.section, r.len, r.enc, r.numel, r.nnz, ref, where);
      if (!allow_nonfinite) check_finite(ps.p + r.values, r.nnz, ps.vt, where);
      if (r.nnz) std::memcpy(val + at_[t] * ps.vsize, ps.p + r.values, r.nnz * ps.vsize);
      const int64_t* ix = idx.data_ptr<int64_t>();
      int64_t prev_tile = -1;
      for (int64_t i = 0; i < r.nnz; ++i) {
        const int64_t j = starts[t] + ix[i];
        loc[at_[t] + i] = static_cast<int16_t>(j & ((1 << kTileBits) - 1));
        const int64_t tile = j >> kTileBits;
        if (i > 0)  // tiles that start between this entry and the one before it
          for (int64_t q = prev_tile + 1; q <= tile; ++q) off[q] = static_cast<int32_t>(at_[t] + i);
        prev_tile = tile;
      }
      if (r.nnz) {
        first[t] = starts[t] + ix[0];
        last[t] = starts[t] + ix[r.nnz - 1];
      }
    }
  });
  // tiles before each tensor's first entry (back to the previous entry) and after the end
  int64_t prev_tile = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (first[t] < 0) continue;
    for (int64_t q = prev_tile + 1; q <= (first[t] >> kTileBits); ++q)
      off[q] = static_cast<int32_t>(at_[t]);
    prev_tile = last[t] >> kTileBits;
  }
  for (int64_t q = prev_tile + 1; q <= tiles; ++q) off[q] = static_cast<int32_t>(at_[T]);
  return {offsets, local, values};
}

// The CRC-32 of a uint8 tensor (what a payload's last 4 bytes hold for the rest).
int64_t codec_crc32(const at::Tensor& data) {
  TORCH_CHECK_VALUE(data.device().is_cpu() && data.scalar_type() == at::kByte &&
                    data.dim() == 1, "codec_crc32: data must be a 1-D uint8 CPU tensor");
  const at::Tensor d = data.contiguous();
  return crc32_parallel(d.data_ptr<uint8_t>(), d.numel());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("codec_crc32(Tensor data) -> int");
  m.def("codec_encode_body(Tensor[] indices, Tensor[] values, int[] numels, Tensor?[] reference, "
        "int value_code) -> Tensor");
  m.def("codec_crc_builtin() -> bool", &crc_builtin);  // no tensor: a catch-all kernel
  m.def("codec_decode(Tensor data, Tensor?[] reference, bool allow_nonfinite) "
        "-> (Tensor[], Tensor[], int[])");
  m.def("codec_decode_tiled(Tensor data, Tensor?[] reference, bool allow_nonfinite, "
        "int[] starts, int[] numels, int numel) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("codec_encode_body", &codec_encode_body);
  m.impl("codec_decode", &codec_decode);
  m.impl("codec_decode_tiled", &codec_decode_tiled);
  m.impl("codec_crc32", &codec_crc32);
}

}  // namespace sparsefl
