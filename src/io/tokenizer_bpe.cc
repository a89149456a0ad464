#include "io/tokenizer_bpe.h"

#include <cstdio>
#include <queue>

#include "io/unicode_text.h"

namespace adakv::tok {

Expected<std::unique_ptr<BpeModel>> BpeModel::create(Vocab vocab,
                                                     const std::vector<std::pair<std::string, std::string>>& merges,
                                                     BpeOptions options) {
  std::unique_ptr<BpeModel> m(new BpeModel());
  m->vocab_ = std::move(vocab);
  m->options_ = std::move(options);
  if (!m->options_.unk_token.empty()) {
    m->unk_id_ = m->token_to_id(m->options_.unk_token);
    if (m->unk_id_ < 0) return data_loss("BPE unk_token '" + m->options_.unk_token + "' is not in the vocabulary");
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    m->byte_ids_[b] = m->token_to_id(name);
  }
  m->merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    int32_t ia = m->token_to_id(a), ib = m->token_to_id(b), merged = m->token_to_id(a + b);
    if (ia < 0 || ib < 0 || merged < 0) {
      return data_loss("BPE merge '" + a + " " + b + "' uses a token that is not in the vocabulary");
    }
    // A repeated pair takes its last rank, as a Rust HashMap built from the list does.
    m->merges_[(uint64_t(uint32_t(ia)) << 32) | uint32_t(ib)] = {static_cast<int32_t>(rank), merged};
  }
  return m;
}

int32_t BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (int32_t id = token_to_id(word); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (word.size() > kCacheMaxWordBytes) {
    merge_word(word, out);
    return;
  }
  {
    std::shared_lock lock(cache_mutex_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = out.size();
  merge_word(word, out);
  std::unique_lock lock(cache_mutex_);
  if (cache_.size() < kCacheMaxEntries) cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + first, out.end()));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool removed;
  };
  // [symbols] doubly linked in word order.
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id) {
    int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, false});
    if (index > 0) symbols[index - 1].next = index;
  };
  bool pending_unk = false;  // an unknown run not yet added (fused when fuse_unk)
  for (size_t i = 0; i < word.size();) {
    size_t start = i;
    unicode::next_code_point(word, i);
    std::string_view ch = word.substr(start, i - start);
    if (int32_t id = token_to_id(ch); id >= 0) {
      if (pending_unk) add(unk_id_);
      pending_unk = false;
      add(id);
      continue;
    }
    if (options_.byte_fallback) {
      bool all = true;
      for (unsigned char c : ch) all = all && byte_ids_[c] >= 0;
      if (all) {
        // tokenizers adds these before a pending unknown run; kept for equality.
        for (unsigned char c : ch) add(byte_ids_[c]);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk && !options_.fuse_unk) add(unk_id_);
      pending_unk = true;
    }
  }
  if (pending_unk) add(unk_id_);

  struct Merge {
    int32_t rank, pos, new_id;
  };
  // Lowest rank first, then leftmost.
  auto later = [](const Merge& a, const Merge& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
  auto lookup = [&](int32_t left, int32_t right) -> const MergeResult* {
    auto it = merges_.find((uint64_t(uint32_t(left)) << 32) | uint32_t(right));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t k = 0; k + 1 < symbols.size(); ++k) {
    if (const MergeResult* m = lookup(symbols[k].id, symbols[k + 1].id)) {
      queue.push({m->rank, static_cast<int32_t>(k), m->new_id});
    }
  }
  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.removed || cur.next < 0) continue;
    int32_t next_pos = cur.next;
    const MergeResult* m = lookup(cur.id, symbols[next_pos].id);
    if (m == nullptr || m->new_id != top.new_id) continue;  // expired entry
    cur.id = top.new_id;
    symbols[next_pos].removed = true;
    cur.next = symbols[next_pos].next;
    if (cur.next >= 0) symbols[cur.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeResult* p = lookup(symbols[cur.prev].id, cur.id)) queue.push({p->rank, cur.prev, p->new_id});
    }
    if (cur.next >= 0) {
      if (const MergeResult* n = lookup(cur.id, symbols[cur.next].id)) queue.push({n->rank, top.pos, n->new_id});
    }
  }
  for (const Symbol& s : symbols) {
    if (!s.removed) out.push_back(s.id);
  }
}

}  // namespace adakv::tok
