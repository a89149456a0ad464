#include "eval/sequence_matcher.h"

#include <algorithm>
#include <unordered_map>
#include <vector>

namespace adakv::eval {
namespace {

struct Match {
  int i, j, size;
};

class Matcher {
 public:
  Matcher(std::u32string_view a, std::u32string_view b) : a_(a), b_(b) {
    const int n = static_cast<int>(b.size());
    for (int j = 0; j < n; ++j) b2j_[b[j]].push_back(j);
    if (n >= 200) {
      const size_t ntest = static_cast<size_t>(n / 100 + 1);
      for (auto it = b2j_.begin(); it != b2j_.end();) {
        it = it->second.size() > ntest ? b2j_.erase(it) : std::next(it);
      }
    }
    prev_.assign(b.size() + 1, 0);
    cur_.assign(b.size() + 1, 0);
  }

  // difflib's find_longest_match; no junk (isjunk is None), so only the non-junk extension
  // loops can do anything.
  Match find_longest_match(int alo, int ahi, int blo, int bhi) {
    int besti = alo, bestj = blo, bestsize = 0;
    // prev_[j + 1]: length of the match ending at a[i - 1], b[j] (difflib's j2len dict for the
    // previous i); only the indices in prev_touched_ are non-zero.
    for (int i = alo; i < ahi; ++i) {
      auto found = b2j_.find(a_[i]);
      if (found != b2j_.end()) {
        for (int j : found->second) {
          if (j < blo) continue;
          if (j >= bhi) break;
          int k = prev_[j] + 1;
          cur_[j + 1] = k;
          cur_touched_.push_back(j + 1);
          if (k > bestsize) {
            besti = i - k + 1;
            bestj = j - k + 1;
            bestsize = k;
          }
        }
      }
      for (int idx : prev_touched_) prev_[idx] = 0;
      prev_touched_.clear();
      std::swap(prev_, cur_);
      std::swap(prev_touched_, cur_touched_);
    }
    for (int idx : prev_touched_) prev_[idx] = 0;
    prev_touched_.clear();
    while (besti > alo && bestj > blo && a_[besti - 1] == b_[bestj - 1]) {
      --besti;
      --bestj;
      ++bestsize;
    }
    while (besti + bestsize < ahi && bestj + bestsize < bhi && a_[besti + bestsize] == b_[bestj + bestsize]) {
      ++bestsize;
    }
    return {besti, bestj, bestsize};
  }

  size_t matches() {
    size_t total = 0;
    struct Range {
      int alo, ahi, blo, bhi;
    };
    std::vector<Range> queue{{0, static_cast<int>(a_.size()), 0, static_cast<int>(b_.size())}};
    while (!queue.empty()) {
      Range r = queue.back();
      queue.pop_back();
      Match m = find_longest_match(r.alo, r.ahi, r.blo, r.bhi);
      if (m.size == 0) continue;
      total += static_cast<size_t>(m.size);
      if (r.alo < m.i && r.blo < m.j) queue.push_back({r.alo, m.i, r.blo, m.j});
      if (m.i + m.size < r.ahi && m.j + m.size < r.bhi) {
        queue.push_back({m.i + m.size, r.ahi, m.j + m.size, r.bhi});
      }
    }
    return total;
  }

 private:
  std::u32string_view a_, b_;
  std::unordered_map<char32_t, std::vector<int>> b2j_;  // element -> ascending positions in b
  std::vector<int> prev_, cur_;                          // [len(b) + 1]
  std::vector<int> prev_touched_, cur_touched_;
};

}  // namespace

size_t sequence_matcher_matches(std::u32string_view a, std::u32string_view b) {
  if (a.empty() || b.empty()) return 0;
  return Matcher(a, b).matches();
}

double sequence_matcher_ratio(std::u32string_view a, std::u32string_view b) {
  size_t length = a.size() + b.size();
  if (length == 0) return 1.0;
  return 2.0 * static_cast<double>(sequence_matcher_matches(a, b)) / static_cast<double>(length);
}

}  // namespace adakv::eval
