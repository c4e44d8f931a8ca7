-- Specs for rr.suggest: the edit distance and closest match behind every
-- "did you mean" hint.
local suggest = require("rr.suggest")

describe("rr.suggest", function()
  describe("distance", function()
    it("counts inserts, deletes and substitutions", function()
      assert.equal(0, suggest.distance("", ""))
      assert.equal(0, suggest.distance("worker", "worker"))
      assert.equal(3, suggest.distance("", "abc"))
      assert.equal(3, suggest.distance("abc", ""))
      assert.equal(1, suggest.distance("helth", "health"))
      assert.equal(1, suggest.distance("health", "helth"))
      assert.equal(1, suggest.distance("db", "dc"))
      assert.equal(3, suggest.distance("kitten", "sitting"))
    end)

    it("counts a swapped pair of neighbours as one edit", function()
      assert.equal(1, suggest.distance("nmae", "name"))
      assert.equal(1, suggest.distance("wroker", "worker"))
      assert.equal(1, suggest.distance("redsi", "redis"))
      -- Optimal string alignment: no edits inside a swapped pair.
      assert.equal(3, suggest.distance("ca", "abc"))
    end)

    it("is case-sensitive", function()
      assert.equal(1, suggest.distance("Api", "api"))
    end)
  end)

  describe("max_distance", function()
    it("allows a third of the word, and one edit in a short word", function()
      assert.equal(1, suggest.max_distance(""))
      assert.equal(1, suggest.max_distance("db"))
      assert.equal(1, suggest.max_distance("dbb"))
      assert.equal(2, suggest.max_distance("health"))
      assert.equal(3, suggest.max_distance("deploy_path"))
    end)
  end)

  describe("closest", function()
    it("returns the candidate with the fewest edits, as given", function()
      assert.equal("worker", suggest.closest("wroker", { "db", "worker", "web" }))
      assert.equal("Worker", suggest.closest("wroker", { "Worker" }))
    end)

    it("ignores case", function()
      assert.equal("API", suggest.closest("api", { "db", "API" }))
      assert.equal("db", suggest.closest("DB", { "db" }))
    end)

    it("breaks a tie by order", function()
      assert.equal("da", suggest.closest("dd", { "da", "db" }))
      assert.equal("db", suggest.closest("dd", { "db", "da" }))
    end)

    it("returns nil when nothing is close enough", function()
      assert.is_nil(suggest.closest("zzz", { "db", "worker" }))
      assert.is_nil(suggest.closest("db", {}))
      assert.is_nil(suggest.closest("helth", { "health" }, 0))
    end)

    it("raises on misuse, at the caller", function()
      assert.has_error(function() suggest.closest(nil, {}) end,
        "rr.suggest.closest: word must be a string, got nil")
      assert.has_error(function() suggest.closest("db", "db") end,
        "rr.suggest.closest: candidates must be a list of strings, got string")
    end)

    it("takes a bound", function()
      assert.is_nil(suggest.closest("dbxx", { "db" }))
      assert.equal("db", suggest.closest("dbxx", { "db" }, 2))
    end)
  end)
end)
