-- Specs for rr.dag: ordering, selection, cycles, dependents, readiness.
local dag = require("rr.dag")

-- Names of a list of service tables, for exact comparisons.
local function names(list)
  local out = {}
  for i, svc in ipairs(list) do out[i] = svc.name end
  return out
end

local function svc(name, ...)
  return { name = name, depends = { ... } }
end

-- The example platform's shape.
local platform = {
  svc("api", "db", "cache"),
  svc("db"),
  svc("cache"),
  svc("worker", "api"),
  svc("web", "api"),
  svc("metrics"),
}

describe("rr.dag", function()
  describe("order", function()
    it("puts dependencies first and breaks ties by declaration order", function()
      assert.same({ "db", "cache", "api", "worker", "web", "metrics" }, names(dag.order(platform)))
    end)

    it("takes the ready service declared first, not a depth-first walk", function()
      local services = { svc("a", "c"), svc("b"), svc("c"), svc("d", "a", "b") }
      assert.same({ "b", "c", "a", "d" }, names(dag.order(services)))
    end)

    it("keeps declaration order when nothing depends on anything", function()
      assert.same({ "z", "y", "x" }, names(dag.order({ svc("z"), svc("y"), svc("x") })))
    end)

    it("returns the service tables themselves", function()
      assert.equal(platform[2], dag.order(platform)[1])
    end)

    it("restricts to a selection without pulling dependencies in", function()
      assert.same({ "api" }, names(dag.order(platform, { "api" })))
      assert.same({ "db", "api", "web" }, names(dag.order(platform, { "web", "api", "db" })))
    end)

    it("respects dependencies through unselected services", function()
      local chain = { svc("top", "mid"), svc("mid", "base"), svc("base") }
      assert.same({ "base", "top" }, names(dag.order(chain, { "top", "base" })))
    end)

    it("accepts an empty selection and a repeated name", function()
      assert.same({}, dag.order(platform, {}))
      assert.same({ "db" }, names(dag.order(platform, { "db", "db" })))
    end)

    it("rejects an unknown selected name with a hint", function()
      local ordered, err = dag.order(platform, { "db", "wroker" })
      assert.is_nil(ordered)
      assert.equal('unknown service "wroker" (did you mean "worker"?)', err)
      assert.same({ nil, 'unknown service "nope"' }, { dag.order(platform, { "nope" }) })
    end)

    it("reports a cycle instead of an order", function()
      local ordered, err = dag.order({ svc("a", "b"), svc("b", "a"), svc("c") })
      assert.is_nil(ordered)
      assert.equal("dependency cycle: a -> b -> a", err)
    end)

    it("reports unknown dependencies and duplicate names", function()
      assert.same({ nil, 'service "a" depends on unknown service "x"' }, { dag.order({ svc("a", "x") }) })
      assert.same({ nil, 'duplicate service name "a"' }, { dag.order({ svc("a"), svc("a") }) })
    end)

    it("raises on misuse", function()
      assert.has_error(function() dag.order("services") end,
        "rr.dag: services must be a list of services, got string")
      assert.has_error(function() dag.order({ { depends = {} } }) end,
        "rr.dag: services[1] must be a table with a string name")
      assert.has_error(function() dag.order(platform, "api") end,
        "rr.dag: selection must be a list of names or nil, got string")
    end)
  end)

  describe("find_cycle", function()
    it("returns nil for an acyclic graph", function()
      assert.is_nil(dag.find_cycle(platform))
    end)

    it("returns the cycle from its first declared service, first name repeated", function()
      local services = { svc("x"), svc("c", "a"), svc("a", "b"), svc("b", "c") }
      assert.same({ "c", "a", "b", "c" }, dag.find_cycle(services))
    end)

    it("finds a self dependency", function()
      assert.same({ "a", "a" }, dag.find_cycle({ svc("a", "a") }))
    end)

    it("returns the shortest cycle through the first service", function()
      local services = { svc("a", "b", "c"), svc("b", "c"), svc("c", "a") }
      assert.same({ "a", "c", "a" }, dag.find_cycle(services))
    end)

    it("find_cycles returns one cycle per group, in declaration order", function()
      local services = { svc("p", "q"), svc("a", "b"), svc("q", "p"), svc("b", "a"), svc("ok", "a") }
      assert.same({ { "p", "q", "p" }, { "a", "b", "a" } }, dag.find_cycles(services))
    end)

    it("ignores unknown dependencies", function()
      assert.is_nil(dag.find_cycle({ svc("a", "ghost") }))
    end)
  end)

  describe("dependents", function()
    it("returns every transitive dependent in declaration order", function()
      assert.same({ "api", "worker", "web" }, dag.dependents(platform, "db"))
      assert.same({ "worker", "web" }, dag.dependents(platform, "api"))
      assert.same({}, dag.dependents(platform, "metrics"))
    end)

    it("rejects an unknown name", function()
      assert.same({ nil, 'unknown service "dbb" (did you mean "db"?)' }, { dag.dependents(platform, "dbb") })
    end)
  end)

  describe("ready", function()
    it("returns the services whose dependencies are done", function()
      assert.same({ "db", "cache", "metrics" }, names(dag.ready(platform, nil, {})))
      assert.same({ "cache", "metrics" }, names(dag.ready(platform, nil, { db = true })))
      assert.same({ "api", "metrics" }, names(dag.ready(platform, nil, { db = true, cache = true })))
    end)

    it("leaves out the services already started (in flight)", function()
      local done, started = { db = true }, { db = true, cache = true, metrics = true }
      assert.same({}, names(dag.ready(platform, nil, done, started)))
      done.cache = true
      assert.same({ "api" }, names(dag.ready(platform, nil, done, started)))
    end)

    it("waits only for selected dependencies", function()
      assert.same({ "api", "metrics" }, names(dag.ready(platform, { "api", "metrics" }, {})))
      local chain = { svc("top", "mid"), svc("mid", "base"), svc("base") }
      assert.same({ "base" }, names(dag.ready(chain, { "top", "base" }, {})))
      assert.same({ "top" }, names(dag.ready(chain, { "top", "base" }, { base = true })))
    end)

    it("never makes ready a service whose dependency failed", function()
      local started = { db = true, cache = true }
      assert.same({ "metrics" }, names(dag.ready(platform, nil, { cache = true }, started)))
    end)

    it("has a scheduler form computed once", function()
      local scheduler = assert(dag.scheduler(platform, { "web", "api", "db" }))
      assert.same({ "db", "api", "web" }, names(scheduler.ordered))
      assert.same({ "db" }, names(scheduler:ready({})))
      assert.same({ "api" }, names(scheduler:ready({ db = true })))
      assert.same({ nil, 'unknown service "x"' }, { dag.scheduler(platform, { "x" }) })
    end)
  end)

  describe("layers", function()
    it("groups the order in waves", function()
      local layers = dag.layers(platform)
      local waves = {}
      for k, wave in ipairs(layers) do waves[k] = names(wave) end
      assert.same({ { "db", "cache", "metrics" }, { "api" }, { "worker", "web" } }, waves)
    end)

    it("groups a selection through unselected services", function()
      local chain = { svc("top", "mid"), svc("mid", "base"), svc("base"), svc("side") }
      local waves = {}
      for k, wave in ipairs(dag.layers(chain, { "top", "base", "side" })) do waves[k] = names(wave) end
      assert.same({ { "base", "side" }, { "top" } }, waves)
    end)
  end)
end)
