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

  describe("blocked_by", function()
    it("names, for every service behind a failed one, the failed service", function()
      assert.same({ api = "db", worker = "db", web = "db" }, dag.blocked_by(platform, { "db" }))
      assert.same({ worker = "api", web = "api" }, dag.blocked_by(platform, { "api" }))
      assert.same({}, dag.blocked_by(platform, { "metrics" }))
      assert.same({}, dag.blocked_by(platform, {}))
    end)

    it("names the earliest of a list, the first declared of a set", function()
      assert.same({ api = "cache", worker = "cache", web = "cache" }, dag.blocked_by(platform, { "cache", "db" }))
      assert.same({ api = "db", worker = "db", web = "db" }, dag.blocked_by(platform, { db = true, cache = true }))
      -- a failed service behind another one is blocked by it, and so is what is behind both
      assert.same({ api = "db", worker = "db", web = "db" }, dag.blocked_by(platform, { "db", "api" }))
      assert.same({ worker = "api", web = "api" }, dag.blocked_by(platform, { api = true, metrics = true }))
    end)

    it("looks through every service, and at the nearest failure only when it ranks first", function()
      local chain = { svc("top", "mid"), svc("mid", "base"), svc("base"), svc("side", "top") }
      assert.same({ mid = "base", top = "base", side = "base" }, dag.blocked_by(chain, { "base" }))
      assert.same({ mid = "base", top = "mid", side = "mid" }, dag.blocked_by(chain, { "mid", "base" }))
      assert.same({ mid = "base", top = "base", side = "base" }, dag.blocked_by(chain, { "base", "mid" }))
      -- a set: top is declared before base
      assert.same({ mid = "base", top = "base", side = "top" }, dag.blocked_by(chain, { top = true, base = true }))
    end)

    it("rejects an unknown name and what dag.order rejects", function()
      assert.same({ nil, 'unknown service "dbb" (did you mean "db"?)' }, { dag.blocked_by(platform, { "dbb" }) })
      assert.same({ nil, 'unknown service "dbb" (did you mean "db"?)' }, { dag.blocked_by(platform, { dbb = true }) })
      assert.same({ nil, "dependency cycle: a -> b -> a" }, { dag.blocked_by({ svc("a", "b"), svc("b", "a") }, { "a" }) })
      assert.same({ nil, 'service "a" depends on unknown service "x"' }, { dag.blocked_by({ svc("a", "x") }, {}) })
    end)

    it("raises on misuse", function()
      assert.has_error(function() dag.blocked_by(platform, "db") end,
        "rr.dag: failed must be a list or a set of names, got string")
      assert.has_error(function() dag.blocked_by(platform, { 1 }) end,
        "rr.dag: failed must be a list or a set of names, found a number")
    end)
  end)

  describe("scheduler", function()
    it("hands out at most limit services, in restart order", function()
      local scheduler = assert(dag.scheduler(platform))
      local done, started = {}, {}
      assert.same({ "db", "cache" }, names(scheduler:ready(done, started, 2)))
      assert.same({ "db", "cache", "metrics" }, names(scheduler:ready(done, started)))
      assert.same({}, names(scheduler:ready(done, started, 0)))
      started.db, started.cache = true, true
      assert.same({ "metrics" }, names(scheduler:ready(done, started, 2)))
      done.db = true
      assert.same({ "metrics" }, names(scheduler:ready(done, started, 2)))
      done.cache = true
      assert.same({ "api", "metrics" }, names(scheduler:ready(done, started, 2)))
      started.metrics, started.api, done.metrics, done.api = true, true, true, true
      assert.same({ "worker" }, names(scheduler:ready(done, started, 1)))
      assert.same({ "worker", "web" }, names(scheduler:ready(done, started)))
    end)

    it("notices a service found done when it becomes ready, and waits for the whole chain", function()
      local chain = { svc("top", "mid"), svc("mid", "base"), svc("base") }
      local scheduler = assert(dag.scheduler(chain, { "top", "base" }))
      -- done before its prerequisites: top still waits for base
      assert.same({ "base" }, names(scheduler:ready({ top = true }, {})))
      assert.same({}, names(scheduler:ready({ top = true, base = true }, {})))
      local again = assert(dag.scheduler(chain, { "top", "base" }))
      assert.same({ "base" }, names(again:ready({}, {})))
      assert.same({ "top" }, names(again:ready({ base = true }, { base = true })))
    end)

    it("never hands out what is behind a failed service", function()
      local scheduler = assert(dag.scheduler(platform))
      local done, started = {}, { db = true, cache = true, metrics = true }
      assert.same({}, names(scheduler:ready(done, started)))
      done.cache, done.metrics = true, true -- db failed: started, never done
      assert.same({}, names(scheduler:ready(done, started)))
    end)

    it("raises on a bad limit", function()
      local scheduler = assert(dag.scheduler(platform))
      assert.has_error(function() scheduler:ready({}, {}, -1) end, "rr.dag: limit must be an integer >= 0 or nil, got -1")
      assert.has_error(function() scheduler:ready({}, {}, 1.5) end, "rr.dag: limit must be an integer >= 0 or nil, got 1.5")
    end)
  end)

  -- The definitions, written the slow and obvious way, against the fast ones on
  -- generated graphs (layered, declared out of order, with random selections).
  describe("matches its definitions on generated graphs", function()
    local function generate(seed, count)
      local function random(k)
        seed = (seed * 1103515245 + 12345) % 2147483648
        return seed % k + 1
      end
      local rank = {} -- a hidden topological rank: depends only point to lower ranks
      for i = 1, count do rank[i] = random(count) * count + i end
      local services = {}
      for i = 1, count do
        local deps = {}
        for _ = 1, random(4) - 1 do
          local j = random(count)
          if rank[j] < rank[i] then deps[#deps + 1] = "s" .. j end
        end
        services[i] = svc("s" .. i, table.unpack(deps))
      end
      local selected
      if random(3) > 1 then
        selected = {}
        for i = 1, count do
          if random(2) == 1 then selected[#selected + 1] = "s" .. i end
        end
      end
      local failed = {}
      for _ = 1, random(4) - 1 do failed[#failed + 1] = "s" .. random(count) end
      return services, selected, failed
    end

    local function by_name(services)
      local map = {}
      for _, s in ipairs(services) do map[s.name] = s end
      return map
    end

    -- Transitive dependencies of a service, by repeated expansion.
    local function ancestors(services, name)
      local map, seen, queue = by_name(services), {}, { name }
      while #queue > 0 do
        local current = table.remove(queue)
        for _, d in ipairs(map[current].depends) do
          if not seen[d] then
            seen[d] = true
            queue[#queue + 1] = d
          end
        end
      end
      return seen
    end

    -- dag.order by its definition: repeatedly the first declared service whose
    -- dependencies are all placed, keeping the selected ones.
    local function slow_order(services, selected)
      local placed, order, wanted = {}, {}, nil
      if selected then
        wanted = {}
        for _, n in ipairs(selected) do wanted[n] = true end
      end
      for _ = 1, #services do
        for _, s in ipairs(services) do
          if not placed[s.name] then
            local ready = true
            for _, d in ipairs(s.depends) do
              if not placed[d] then ready = false end
            end
            if ready then
              placed[s.name] = true
              if not wanted or wanted[s.name] then order[#order + 1] = s.name end
              break
            end
          end
        end
      end
      return order
    end

    it("order, layers, dependents, blocked_by, ready and a whole scheduler run", function()
      for seed = 1, 40 do
        local services, selected, failed = generate(seed, 40)
        local order = slow_order(services, selected)
        assert.same(order, names(assert(dag.order(services, selected))))
        local is_selected = {}
        for _, n in ipairs(order) do is_selected[n] = true end

        -- layers: a service's wave is one more than its latest selected ancestor's
        local wave_of, expected = {}, {}
        for _, n in ipairs(order) do
          local wave = 1
          for a in pairs(ancestors(services, n)) do
            if is_selected[a] and wave_of[a] + 1 > wave then wave = wave_of[a] + 1 end
          end
          wave_of[n] = wave
          expected[wave] = expected[wave] or {}
          table.insert(expected[wave], n)
        end
        local layers = {}
        for k, wave in ipairs(assert(dag.layers(services, selected))) do layers[k] = names(wave) end
        assert.same(expected, layers)

        -- dependents and blocked_by: through ancestors
        local behind, blocked = {}, {}
        for _, s in ipairs(services) do
          behind[s.name] = ancestors(services, s.name)
          for _, f in ipairs(failed) do
            if behind[s.name][f] and blocked[s.name] == nil then blocked[s.name] = f end
          end
        end
        for _, s in ipairs(services) do
          local dependents = {}
          for _, other in ipairs(services) do
            if behind[other.name][s.name] then dependents[#dependents + 1] = other.name end
          end
          assert.same(dependents, assert(dag.dependents(services, s.name)))
        end
        assert.same(blocked, assert(dag.blocked_by(services, failed)))

        -- a run with two slots where the failed services fail: ready by its definition
        local scheduler = assert(dag.scheduler(services, selected))
        local fails = {}
        for _, f in ipairs(failed) do fails[f] = true end
        local done, started, inflight = {}, {}, {}
        while true do
          local want = {}
          for _, n in ipairs(order) do
            if not started[n] then
              local ok = true
              for a in pairs(ancestors(services, n)) do
                if is_selected[a] and not done[a] then ok = false end
              end
              if ok then want[#want + 1] = n end
            end
          end
          assert.same(want, names(assert(dag.ready(services, selected, done, started))))
          local handed = names(scheduler:ready(done, started, 2 - #inflight))
          assert.same({ table.unpack(want, 1, 2 - #inflight) }, handed)
          for _, n in ipairs(handed) do
            started[n] = true
            inflight[#inflight + 1] = n
          end
          if #inflight == 0 then break end
          local finished = table.remove(inflight, 1)
          if not fails[finished] then done[finished] = true end
        end
      end
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
