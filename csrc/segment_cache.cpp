// Exact, cached sentencepiece BPE encoding for code (module megaphi._segment_cache).
//
// sentencepiece's BPE merges adjacent symbols whose concatenation is a vocabulary piece, highest score first
// (ties: leftmost first), and never joins two symbols across a position that no piece spans. For the models
// megaphi/data/fast_sentencepiece.py admits (identity normalization, no dummy prefix, no piece with a
// non-space character followed by a space) that includes every position where a space follows a non-space
// character. So the text is cut there into segments (a run of spaces, then non-spaces), each segment is
// encoded on its own by the same merge procedure, and the ids of repeated segments come from a cache. A
// segment the cache lacks is cut again between any two ASCII characters that no piece holds side by side
// ("foo" | "(" in most vocabularies), and its parts come from the cache too. The ids equal
// SentencePieceProcessor.encode_as_ids on the whole text; the tests compare the two on real code and on
// adversarial strings.
//
// The merges work on piece ids: a table maps (left id, right id) to the merged piece, built from every way of
// cutting a piece into two pieces. That is exact when every character of every piece is itself a piece
// (checked here), so every symbol that can take part in a merge has an id.
//
// Spaces are ' ' (0x20) and the escaped space U+2581 (E2 96 81), which a piece sees identically.
// Plain pybind11, no torch headers.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <bitset>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr char kSpaceSymbol[] = "\xe2\x96\x81";
constexpr int kShortSegment = 64;  // symbols; longer segments use a priority queue instead of scans
constexpr float kNoMerge = -std::numeric_limits<float>::infinity();

// Bytes in the UTF-8 character that starts with byte b (sentencepiece's table: a stray byte counts 1).
inline size_t one_char_len(unsigned char b) {
  static constexpr uint8_t table[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return table[b >> 4];
}

// Width of the space at s[i] (1 or 3 bytes), or 0 when s[i] does not start a space.
inline size_t space_width(const char* s, size_t i, size_t n) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b == 0x20) return 1;
  if (b == 0xE2 && i + 2 < n && static_cast<unsigned char>(s[i + 1]) == 0x96 &&
      static_cast<unsigned char>(s[i + 2]) == 0x81)
    return 3;
  return 0;
}

inline uint64_t mix(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = mix(h ^ v);
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  return mix(h ^ v) | 1;  // 0 marks an empty slot
}

// Open-addressing map from (left id, right id) to the merged piece (id, score); fixed once built.
class MergeTable {
 public:
  struct Merge {
    int id;
    float score;
  };

  void build(const std::vector<std::pair<uint64_t, Merge>>& entries) {
    size_t capacity = 16;
    shift_ = 60;
    for (; capacity < entries.size() * 2; capacity *= 2) --shift_;
    mask_ = capacity - 1;
    keys_.assign(capacity, kEmpty);
    values_.assign(capacity, Merge{-1, 0.0f});
    for (const auto& [key, merge] : entries) {
      size_t slot = slot_of(key);
      while (keys_[slot] != kEmpty && keys_[slot] != key) slot = (slot + 1) & mask_;
      keys_[slot] = key;
      values_[slot] = merge;
    }
  }

  static uint64_t key(int left, int right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  const Merge* find(int left, int right) const {
    const uint64_t k = key(left, right);
    for (size_t slot = slot_of(k);; slot = (slot + 1) & mask_) {
      if (keys_[slot] == k) return &values_[slot];
      if (keys_[slot] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  // Fibonacci hashing: the top bits of the product depend on every bit of the key.
  size_t slot_of(uint64_t k) const { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_); }
  size_t mask_ = 0;
  int shift_ = 60;
  std::vector<uint64_t> keys_;
  std::vector<Merge> values_;
};

// One generation of the segment cache: open addressing over records [key length, id count, key, ids]
// stored end to end in one arena, so a hit touches one slot and one record. The slot table grows as needed.
class CacheGeneration {
 public:
  explicit CacheGeneration(size_t max_entries) : max_entries_(max_entries) { slots_.assign(1024, Slot{0, 0}); }

  size_t size() const { return size_; }
  bool full() const { return size_ >= max_entries_; }

  const int32_t* find(const char* key, size_t n, uint64_t hash, uint32_t* count) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
      const Slot& slot = slots_[i];
      if (slot.hash == 0) return nullptr;
      if (slot.hash != hash) continue;
      const uint32_t* record = arena_.data() + slot.offset;
      if (record[0] == n && std::memcmp(record + 2, key, n) == 0) {
        *count = record[1];
        return reinterpret_cast<const int32_t*>(record + 2 + words(n));
      }
    }
  }

  void insert(const char* key, size_t n, uint64_t hash, const int32_t* ids, size_t count) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    const size_t at = arena_.size();
    place(Slot{hash, at});
    arena_.resize(at + 2 + words(n) + count, 0);
    arena_[at] = static_cast<uint32_t>(n);
    arena_[at + 1] = static_cast<uint32_t>(count);
    std::memcpy(arena_.data() + at + 2, key, n);
    std::memcpy(arena_.data() + at + 2 + words(n), ids, count * sizeof(int32_t));
    ++size_;
  }

  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{0, 0});
    arena_.clear();
    size_ = 0;
  }

 private:
  struct Slot {
    uint64_t hash;  // 0: empty
    size_t offset;  // into arena_, in 32-bit words
  };

  static size_t words(size_t bytes) { return (bytes + 3) / 4; }

  void place(const Slot& slot) {
    const size_t mask = slots_.size() - 1;
    size_t i = slot.hash & mask;
    while (slots_[i].hash != 0) i = (i + 1) & mask;
    slots_[i] = slot;
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2, Slot{0, 0});
    old.swap(slots_);
    for (const Slot& slot : old)
      if (slot.hash != 0) place(slot);
  }

  size_t max_entries_;
  size_t size_ = 0;
  std::vector<Slot> slots_;
  std::vector<uint32_t> arena_;
};

class SegmentEncoder {
 public:
  // pieces/ids/scores: the model's NORMAL pieces. byte_ids: id of <0xXX> for each byte (byte fallback) or
  // empty (an unknown character becomes unk_id, a run of them one unk_id). The cache keeps up to
  // 2 * max_entries segments of at most max_key_bytes in two generations; max_entries 0 disables it.
  SegmentEncoder(const std::vector<std::string>& pieces, const std::vector<int>& ids,
                 const std::vector<float>& scores, int unk_id, std::vector<int> byte_ids, size_t max_entries,
                 size_t max_key_bytes)
      : unk_id_(unk_id),
        byte_ids_(std::move(byte_ids)),
        max_key_bytes_(max_entries ? max_key_bytes : 0),
        young_(max_entries),
        old_(max_entries) {
    if (pieces.size() != ids.size() || pieces.size() != scores.size())
      throw std::invalid_argument("pieces, ids and scores must have the same length");
    if (!byte_ids_.empty() && byte_ids_.size() != 256)
      throw std::invalid_argument("byte_ids must hold 256 ids or none");
    std::unordered_map<std::string_view, MergeTable::Merge> by_piece;
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (pieces[i].empty()) throw std::invalid_argument("empty piece");
      if (!std::isfinite(scores[i])) throw std::invalid_argument("piece score is not finite: " + pieces[i]);
      by_piece.emplace(pieces[i], MergeTable::Merge{ids[i], scores[i]});
    }
    ascii_ids_.fill(-1);
    for (const auto& [piece, value] : by_piece) {
      if (piece.size() == std::min(piece.size(), one_char_len(static_cast<unsigned char>(piece[0])))) {
        set_char_id(piece.data(), piece.size(), value.id);
      }
    }
    for (const auto& [piece, value] : by_piece) {
      int prev = -1;  // the previous character as ASCII ('▁' as ' '), -1 when it is not ASCII
      for (size_t pos = 0; pos < piece.size();) {
        const size_t len = std::min(piece.size() - pos, one_char_len(static_cast<unsigned char>(piece[pos])));
        int c = -1;
        if (len == 1 && static_cast<unsigned char>(piece[pos]) < 128)
          c = static_cast<unsigned char>(piece[pos]);
        else if (piece.substr(pos, len) == kSpaceSymbol)
          c = ' ';
        if (prev >= 0 && c >= 0) ascii_pairs_[prev * 128 + c] = true;
        prev = c;
        pos += len;
      }
    }
    std::vector<std::pair<uint64_t, MergeTable::Merge>> merges;
    for (const auto& [piece, value] : by_piece) {
      for (size_t cut = 0; cut < piece.size();) {
        const size_t len = std::min(piece.size() - cut, one_char_len(static_cast<unsigned char>(piece[cut])));
        if (char_id(piece.data() + cut, len) < 0)
          throw std::invalid_argument("a piece holds a character that is not a piece: " + std::string(piece));
        if (cut > 0) {
          const auto left = by_piece.find(piece.substr(0, cut));
          const auto right = by_piece.find(piece.substr(cut));
          if (left != by_piece.end() && right != by_piece.end())
            merges.emplace_back(MergeTable::key(left->second.id, right->second.id), value);
        }
        cut += len;
      }
    }
    merges_.build(merges);
  }

  py::list encode_batch(const py::list& texts) {
    py::list result(texts.size());
    for (size_t i = 0; i < texts.size(); ++i) result[i] = encode(texts[i]);
    return result;
  }

  py::list encode(const py::handle& text) {
    if (!PyUnicode_Check(text.ptr())) throw py::type_error("encode expects str");
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);
    if (s == nullptr) throw py::error_already_set();
    out_.clear();
    encode_text(s, static_cast<size_t>(n));
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(out_.size()));
    if (list == nullptr) throw py::error_already_set();
    for (size_t k = 0; k < out_.size(); ++k) PyList_SET_ITEM(list, k, PyLong_FromLong(out_[k]));
    return py::reinterpret_steal<py::list>(list);
  }

  size_t cache_size() const { return young_.size() + old_.size(); }

  void clear_cache() {
    young_.clear();
    old_.clear();
  }

 private:
  void set_char_id(const char* s, size_t len, int id) {
    if (len == 1 && static_cast<unsigned char>(s[0]) < 128)
      ascii_ids_[static_cast<unsigned char>(s[0])] = id;
    else
      other_char_ids_[pack_char(s, len)] = id;
  }

  int char_id(const char* s, size_t len) const {
    if (len == 1 && static_cast<unsigned char>(s[0]) < 128) return ascii_ids_[static_cast<unsigned char>(s[0])];
    const auto it = other_char_ids_.find(pack_char(s, len));
    return it == other_char_ids_.end() ? -1 : it->second;
  }

  static uint32_t pack_char(const char* s, size_t len) {
    uint32_t key = 0;
    std::memcpy(&key, s, std::min<size_t>(len, 4));
    return key;
  }

  void encode_text(const char* s, size_t n) {
    size_t begin = 0;
    bool prev_space = false;
    for (size_t i = 0; i < n;) {
      const size_t width = space_width(s, i, n);
      if (width != 0 && !prev_space && i > begin) {
        encode_segment(s + begin, i - begin);
        begin = i;
      }
      prev_space = width != 0;
      i += width != 0 ? width : 1;  // continuation bytes are never 0x20 or 0xE2
    }
    if (begin < n) encode_segment(s + begin, n - begin);
  }

  // Appends the ids of s, a segment or (split false) a part of one, from the cache or else computed.
  void encode_segment(const char* s, size_t n, bool split = true) {
    if (n > max_key_bytes_) {
      split ? encode_parts(s, n) : bpe(s, n);
      return;
    }
    const uint64_t hash = hash_bytes(s, n);
    uint32_t count = 0;
    if (const int32_t* ids = young_.find(s, n, hash, &count)) {
      out_.insert(out_.end(), ids, ids + count);
      return;
    }
    const size_t start = out_.size();
    if (const int32_t* ids = old_.find(s, n, hash, &count))
      out_.insert(out_.end(), ids, ids + count);  // still in use: copied into the young generation below
    else if (split)
      encode_parts(s, n);
    else
      bpe(s, n);
    // A full young generation becomes the old one (dropping the old), so memory stays bounded and the
    // segments in use survive.
    if (young_.full()) {
      std::swap(old_, young_);
      young_.clear();
    }
    young_.insert(s, n, hash, out_.data() + start, out_.size() - start);
  }

  // A segment the cache lacks: cut it again wherever two neighbouring characters occur side by side in no
  // piece (no merge can cross there either), so that most of it comes from the cache after all.
  void encode_parts(const char* s, size_t n) {
    size_t begin = 0;
    for (size_t i = 1; i < n; ++i) {
      if (separable(static_cast<unsigned char>(s[i - 1]), static_cast<unsigned char>(s[i]))) {
        encode_segment(s + begin, i - begin, false);
        begin = i;
      }
    }
    if (begin == 0)
      bpe(s, n);
    else
      encode_segment(s + begin, n - begin, false);
  }

  // Whether a cut between ASCII characters a and b leaves the ids unchanged (others are never cut).
  bool separable(unsigned char a, unsigned char b) const {
    if (a >= 128 || b >= 128 || ascii_pairs_[a * 128 + b]) return false;
    // Without byte fallback sentencepiece joins a run of unknown characters into one <unk>: keep runs whole.
    return !byte_ids_.empty() || ascii_ids_[a] >= 0 || ascii_ids_[b] >= 0;
  }

  // sentencepiece's BPE on one segment (raw bytes; spaces are escaped here), appending ids to out_.
  void bpe(const char* s, size_t n) {
    norm_.clear();
    for (size_t i = 0; i < n; ++i) {
      if (s[i] == ' ')
        norm_.append(kSpaceSymbol, 3);
      else
        norm_.push_back(s[i]);
    }
    size_t chars = 0;
    for (size_t pos = 0; pos < norm_.size(); ++chars)
      pos += std::min(norm_.size() - pos, one_char_len(static_cast<unsigned char>(norm_[pos])));
    if (chars <= kShortSegment)
      bpe_short();
    else
      bpe_long();
  }

  void emit(int id, uint32_t begin, uint32_t len, bool* prev_unknown) {
    if (id >= 0) {
      out_.push_back(id);
      *prev_unknown = false;
    } else if (!byte_ids_.empty()) {
      for (uint32_t k = 0; k < len; ++k) out_.push_back(byte_ids_[static_cast<unsigned char>(norm_[begin + k])]);
    } else {
      if (!*prev_unknown) out_.push_back(unk_id_);  // sentencepiece joins a run of unknowns into one
      *prev_unknown = true;
    }
  }

  // Short segments: symbols in one contiguous array; each step scans the pair scores for the best merge
  // (leftmost on ties) and closes the gap. The same order as sentencepiece's queue, without the queue.
  void bpe_short() {
    int n = 0;
    for (size_t pos = 0; pos < norm_.size(); ++n) {
      const size_t len = std::min(norm_.size() - pos, one_char_len(static_cast<unsigned char>(norm_[pos])));
      short_[n] = ShortSymbol{char_id(norm_.data() + pos, len), static_cast<uint32_t>(pos),
                              static_cast<uint32_t>(len), kNoMerge, -1};
      pos += len;
    }
    for (int i = 0; i + 1 < n; ++i) set_short_pair(i, n);
    while (true) {
      int best = -1;
      float best_score = kNoMerge;
      for (int i = 0; i + 1 < n; ++i) {
        if (short_[i].score > best_score) {
          best = i;
          best_score = short_[i].score;
        }
      }
      if (best < 0) break;
      ShortSymbol& left = short_[best];
      left.id = left.merged;
      left.len += short_[best + 1].len;
      std::memmove(&short_[best + 1], &short_[best + 2], (n - best - 2) * sizeof(ShortSymbol));
      --n;
      set_short_pair(best, n);
      if (best > 0) set_short_pair(best - 1, n);
    }
    bool prev_unknown = false;
    for (int i = 0; i < n; ++i) emit(short_[i].id, short_[i].begin, short_[i].len, &prev_unknown);
  }

  // The merge of short_[i] with short_[i + 1], if their concatenation is a piece.
  void set_short_pair(int i, int n) {
    ShortSymbol& sym = short_[i];
    sym.score = kNoMerge;
    if (i + 1 >= n || sym.id < 0 || short_[i + 1].id < 0) return;  // a non-piece character is in no piece
    if (const auto* merge = merges_.find(sym.id, short_[i + 1].id)) {
      sym.score = merge->score;
      sym.merged = merge->id;
    }
  }

  struct ShortSymbol {
    int id;  // piece id, -1 for a character that is not a piece
    uint32_t begin;
    uint32_t len;
    float score;  // of merging with the next symbol; kNoMerge when that is no piece
    int merged;   // the piece that merge makes
  };

  struct Symbol {
    int prev;  // previous live symbol, -1 at the start
    int next;  // next live symbol, -1 at the end
    int id;    // piece id, -1 for a character that is not a piece
    uint32_t begin;
    uint32_t len;  // 0 once merged into its left neighbour
  };

  struct Pair {
    float score;
    int left;
    int right;
    int left_id;  // the ids when queued: if a symbol changed since (it only grows, so its id changes), stale
    int right_id;
    int merged;
  };

  // Max-heap order of sentencepiece's agenda: higher score first, then the leftmost pair.
  struct PairLess {
    bool operator()(const Pair& a, const Pair& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };

  // Long segments: sentencepiece's own scheme, a linked list of symbols and a queue of candidate merges.
  void bpe_long() {
    const size_t m = norm_.size();
    symbols_.clear();
    for (size_t pos = 0; pos < m;) {
      const size_t len = std::min(m - pos, one_char_len(static_cast<unsigned char>(norm_[pos])));
      const int index = static_cast<int>(symbols_.size());
      symbols_.push_back(Symbol{index - 1, pos + len < m ? index + 1 : -1, char_id(norm_.data() + pos, len),
                                static_cast<uint32_t>(pos), static_cast<uint32_t>(len)});
      pos += len;
    }
    agenda_.clear();
    for (size_t i = 1; i < symbols_.size(); ++i) add_pair(static_cast<int>(i) - 1, static_cast<int>(i));
    while (!agenda_.empty()) {
      std::pop_heap(agenda_.begin(), agenda_.end(), PairLess());
      const Pair top = agenda_.back();
      agenda_.pop_back();
      Symbol& left = symbols_[top.left];
      Symbol& right = symbols_[top.right];
      if (left.len == 0 || right.len == 0 || left.id != top.left_id || right.id != top.right_id) continue;
      left.id = top.merged;
      left.len += right.len;
      left.next = right.next;
      if (right.next >= 0) symbols_[right.next].prev = top.left;
      right.len = 0;
      add_pair(left.prev, top.left);
      add_pair(top.left, left.next);
    }
    bool prev_unknown = false;
    for (int i = symbols_.empty() ? -1 : 0; i != -1; i = symbols_[i].next)
      emit(symbols_[i].id, symbols_[i].begin, symbols_[i].len, &prev_unknown);
  }

  void add_pair(int left, int right) {
    if (left < 0 || right < 0) return;
    const int left_id = symbols_[left].id;
    const int right_id = symbols_[right].id;
    if (left_id < 0 || right_id < 0) return;
    const auto* merge = merges_.find(left_id, right_id);
    if (merge == nullptr) return;
    agenda_.push_back(Pair{merge->score, left, right, left_id, right_id, merge->id});
    std::push_heap(agenda_.begin(), agenda_.end(), PairLess());
  }

  MergeTable merges_;
  std::array<int, 128> ascii_ids_;
  std::bitset<128 * 128> ascii_pairs_;  // (a, b) set when some piece holds ASCII a followed by b
  std::unordered_map<uint32_t, int> other_char_ids_;
  int unk_id_;
  std::vector<int> byte_ids_;

  size_t max_key_bytes_;
  CacheGeneration young_, old_;

  // Scratch, reused across segments.
  std::string norm_;
  std::vector<int32_t> out_;
  std::array<ShortSymbol, kShortSegment> short_;
  std::vector<Symbol> symbols_;
  std::vector<Pair> agenda_;
};

}  // namespace

PYBIND11_MODULE(_segment_cache, m) {
  m.doc() = "Exact, cached sentencepiece BPE encoding for code (see megaphi/data/fast_sentencepiece.py).";
  py::class_<SegmentEncoder>(m, "SegmentEncoder")
      .def(py::init<const std::vector<std::string>&, const std::vector<int>&, const std::vector<float>&, int,
                    std::vector<int>, size_t, size_t>(),
           py::arg("pieces"), py::arg("ids"), py::arg("scores"), py::arg("unk_id"), py::arg("byte_ids"),
           py::arg("max_entries"), py::arg("max_key_bytes"))
      .def("encode", &SegmentEncoder::encode, py::arg("text"), "Ids of one text, as encode_as_ids gives them.")
      .def("encode_batch", &SegmentEncoder::encode_batch, py::arg("texts"), "Ids of each text.")
      .def("clear_cache", &SegmentEncoder::clear_cache)
      .def_property_readonly("cache_size", &SegmentEncoder::cache_size);
}
