// Python's difflib.SequenceMatcher(None, a, b) over code points, with its autojunk heuristic
// (for len(b) >= 200, elements of b occurring more than len(b) / 100 + 1 times are "popular":
// they never start a match but extend one). fuzzywuzzy's fuzz.ratio, which LongBench's
// code_sim_score calls, is round(100 * ratio()) through this class when python-Levenshtein is
// not installed (LongBench's requirements).
#pragma once

#include <cstddef>
#include <string_view>

namespace adakv::eval {

// Sum of the sizes of get_matching_blocks(a, b).
size_t sequence_matcher_matches(std::u32string_view a, std::u32string_view b);
// ratio() = 2 * matches / (len(a) + len(b)); 1.0 when both are empty.
double sequence_matcher_ratio(std::u32string_view a, std::u32string_view b);

}  // namespace adakv::eval
