-- rr.suggest: "did you mean" hints for mistyped names.
--
-- One edit distance for every hint (option names in rr.cli, service names in
-- rr.dag, fields and values in rr.services), so that a typo is judged the same
-- way wherever it is made. Each caller words its own message.

local suggest = {}

-- Edits (insert, delete, substitute, swap two neighbours) from a to b: the
-- optimal string alignment distance, where a swapped pair is one typo.
-- Compares bytes, so it is case-sensitive.
function suggest.distance(a, b)
  local d = {}
  for i = 0, #a do d[i] = { [0] = i } end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      d[i][j] = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        d[i][j] = math.min(d[i][j], d[i - 2][j - 2] + 1)
      end
    end
  end
  return d[#a][#b]
end

-- The most edits a typo of `word` may be: a third of the word, and one edit
-- in a short word.
function suggest.max_distance(word)
  return math.max(1, #word // 3)
end

-- The candidate closest to `word`, ignoring case, or nil when none is within
-- `max_distance` edits (default: suggest.max_distance(word)). Fewer edits
-- win; a tie goes to the earlier candidate. Returns the candidate as given.
function suggest.closest(word, candidates, max_distance)
  if type(word) ~= "string" then
    error("rr.suggest.closest: word must be a string, got " .. type(word), 2)
  end
  if type(candidates) ~= "table" then
    error("rr.suggest.closest: candidates must be a list of strings, got " .. type(candidates), 2)
  end
  max_distance = max_distance or suggest.max_distance(word)
  local lowered = word:lower()
  local best, best_distance
  for _, candidate in ipairs(candidates) do
    local d = suggest.distance(lowered, candidate:lower())
    if d <= max_distance and (best_distance == nil or d < best_distance) then
      best, best_distance = candidate, d
    end
  end
  return best
end

return suggest
