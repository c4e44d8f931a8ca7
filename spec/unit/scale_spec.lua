-- Specs for a platform of 10,000 services: loading its services file, validating, ordering,
-- naming what blocks each skipped service and scheduling a whole run. Correctness only: no
-- timing is asserted (every step is O(N + E) or O((N + E) log N); the numbers are measured
-- outside the suite).
local services = require("rr.services")
local dag = require("rr.dag")

local COUNT, LAYERS = 10000, 8

-- A deterministic platform: services in LAYERS layers, each depending on one to three
-- services of the layer below and sometimes one further down, declared in a shuffled order
-- (so that declaration order is not a dependency order). Returns the services file's text
-- and the list of { name, depends } in declaration order.
local function generate()
  local seed = 20240601
  local function random(k)
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed // 65536 % k + 1
  end
  local declared = {}
  for i = 1, COUNT do declared[i] = i end
  for i = COUNT, 2, -1 do
    local j = random(i)
    declared[i], declared[j] = declared[j], declared[i]
  end
  -- declared[k] is the declaration index of the k-th service of the hidden order
  local layer_of, by_layer = {}, {}
  for k = 1, COUNT do
    local layer = (k - 1) * LAYERS // COUNT
    layer_of[declared[k]] = layer
    by_layer[layer] = by_layer[layer] or {}
    table.insert(by_layer[layer], declared[k])
  end
  local function name(i) return ("s%05d"):format(i) end
  local list, lines = {}, {
    "return {",
    "  defaults = { health = { timeout = 30, retries = 3, interval = 1 }, stabilize = 5 },",
    "  services = {",
  }
  for i = 1, COUNT do
    local layer, deps, seen = layer_of[i], {}, {}
    local function add(j)
      if not seen[j] then
        seen[j] = true
        deps[#deps + 1] = name(j)
      end
    end
    if layer > 0 then
      local below = by_layer[layer - 1]
      for _ = 1, random(3) do add(below[random(#below)]) end
      if layer > 1 and random(4) == 1 then
        local further = by_layer[random(layer - 1) - 1]
        add(further[random(#further)])
      end
    end
    list[i] = { name = name(i), depends = deps }
    local quoted = {}
    for k, d in ipairs(deps) do quoted[k] = ("%q"):format(d) end
    local health = i % 2 == 0 and (", health = { url = \"http://127.0.0.1:%d/health\" }"):format(20000 + i) or ""
    lines[#lines + 1] = ("    { name = %q, unit = %q, depends = { %s }%s },"):format(name(i), name(i) .. ".service",
      table.concat(quoted, ", "), health)
  end
  lines[#lines + 1] = "  },"
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n", list
end

describe("a platform of 10,000 services", function()
  local source, list, platform, path

  setup(function()
    source, list = generate()
    path = os.tmpname()
    local file = assert(io.open(path, "wb"))
    file:write(source)
    file:close()
    local problems
    platform, problems = services.load(path)
    assert(platform, problems and table.concat(problems, "\n", 1, math.min(#problems, 5)))
  end)

  teardown(function()
    if path then os.remove(path) end
  end)

  -- Busted's assertions cost about 0.1 ms each: the loops below note the first violation
  -- and assert once.
  local function index_of()
    local map = {}
    for i, svc in ipairs(platform.services) do map[svc.name] = i end
    return map
  end

  it("loads and validates: every service, normalized", function()
    assert.equal(COUNT, #platform.services)
    local bad
    for i, svc in ipairs(platform.services) do
      local same = list[i].name == svc.name and platform.by_name[svc.name] == svc
        and #list[i].depends == #svc.depends
      for k, d in ipairs(list[i].depends) do same = same and svc.depends[k] == d end
      if not same then bad = bad or svc.name end
    end
    assert.is_nil(bad)
    assert.same({ kind = "http", url = "http://127.0.0.1:20002/health", timeout = 30, retries = 3, interval = 1 },
      platform.services[2].health)
    assert.equal("systemd", platform.services[1].health.kind)
  end)

  it("orders it: each service once, after its dependencies, ties to the first declared", function()
    local order = assert(dag.order(platform.services))
    assert.equal(COUNT, #order)
    local position, index, bad = {}, index_of(), nil
    for k, svc in ipairs(order) do
      if position[svc.name] then bad = bad or (svc.name .. " twice") end
      position[svc.name] = k
    end
    for k, svc in ipairs(order) do
      for _, d in ipairs(svc.depends) do
        if not (position[d] < k) then bad = bad or (svc.name .. " before " .. d) end
      end
      -- Kahn's algorithm taking the first declared ready service: a service declared before
      -- the one placed just before it was not ready then, so it waited for that one.
      local previous = order[k - 1]
      if previous and index[svc.name] < index[previous.name] then
        local waited = false
        for _, d in ipairs(svc.depends) do waited = waited or d == previous.name end
        if not waited then bad = bad or (svc.name .. " after " .. previous.name) end
      end
    end
    assert.is_nil(bad)
    -- a selection keeps the same relative order
    local selected, expected = {}, {}
    for i = 1, COUNT, 3 do selected[#selected + 1] = platform.services[i].name end
    local wanted = {}
    for _, n in ipairs(selected) do wanted[n] = true end
    for _, svc in ipairs(order) do
      if wanted[svc.name] then expected[#expected + 1] = svc end
    end
    assert.same(expected, assert(dag.order(platform.services, selected)))
  end)

  it("groups it in waves: each one more than the latest of its dependencies", function()
    local wave_of = {}
    for k, wave in ipairs(assert(dag.layers(platform.services))) do
      for _, svc in ipairs(wave) do wave_of[svc.name] = k end
    end
    local bad
    for _, svc in ipairs(platform.services) do
      local latest = 0
      for _, d in ipairs(svc.depends) do latest = math.max(latest, wave_of[d]) end
      if wave_of[svc.name] ~= latest + 1 then bad = bad or svc.name end
    end
    assert.is_nil(bad)
  end)

  it("names what blocks each service behind three failed ones", function()
    local order = assert(dag.order(platform.services))
    local failed = { order[COUNT // 2].name, order[1].name, order[COUNT // 4].name }
    local rank = {}
    for k, n in ipairs(failed) do rank[n] = k end
    local blocked = assert(dag.blocked_by(platform.services, failed))
    -- the map is the one fixed point of: blocked by the best-ranked failed service among
    -- the dependencies and what blocks them (unique in an acyclic graph)
    local bad
    for _, svc in ipairs(platform.services) do
      local best
      local function consider(candidate)
        if candidate and (best == nil or rank[candidate] < rank[best]) then best = candidate end
      end
      for _, d in ipairs(svc.depends) do
        consider(rank[d] and d)
        consider(blocked[d])
      end
      if blocked[svc.name] ~= best then bad = bad or svc.name end
    end
    assert.is_nil(bad)
    -- and it covers exactly the dependents of the failed services
    local behind = {}
    for _, f in ipairs(failed) do
      for _, n in ipairs(assert(dag.dependents(platform.services, f))) do behind[n] = true end
    end
    local count = 0
    for n in pairs(blocked) do
      if not behind[n] then bad = bad or n end
      count = count + 1
    end
    for _ in pairs(behind) do count = count - 1 end
    assert.is_nil(bad)
    assert.equal(0, count)
  end)

  it("schedules a whole run with 8 slots and a failure", function()
    local order = assert(dag.order(platform.services))
    local failing = order[3].name
    local blocked = assert(dag.blocked_by(platform.services, { failing }))
    local scheduler = assert(dag.scheduler(platform.services))
    local done, started, inflight, handed, bad = {}, {}, {}, 0, nil
    while true do
      for _, svc in ipairs(scheduler:ready(done, started, 8 - #inflight)) do
        for _, d in ipairs(svc.depends) do
          if not done[d] then bad = bad or (svc.name .. " before " .. d) end
        end
        started[svc.name] = true
        inflight[#inflight + 1] = svc.name
        handed = handed + 1
      end
      if #inflight == 0 then break end
      local finished = table.remove(inflight, 1)
      if finished ~= failing then done[finished] = true end
    end
    local skipped = 0
    for _, svc in ipairs(platform.services) do
      if (blocked[svc.name] == nil) ~= (started[svc.name] == true) then bad = bad or svc.name end
      if not started[svc.name] then skipped = skipped + 1 end
    end
    assert.is_nil(bad)
    assert.is_true(skipped > 0)
    assert.equal(COUNT, handed + skipped)
  end)

  it("reports a cycle through all the layers in one line", function()
    -- the first service in the order comes to depend on its last dependent
    local first = assert(dag.order(platform.services))[1]
    local dependents = assert(dag.dependents(platform.services, first.name))
    local last = assert(dag.order(platform.services, dependents))[#dependents]
    local tbl = assert(load(source))()
    local index = index_of()
    tbl.services[index[first.name]].depends = { last.name }
    local result, problems = services.validate(tbl, "services.lua")
    assert.is_true(result == nil) -- not is_nil: a platform of 10,000 would be printed
    assert.equal(1, #problems)
    local cycle = problems[1]:match('field "depends" forms a dependency cycle: (.*)$')
    local names = {}
    for n in cycle:gmatch("[^ >-]+") do names[#names + 1] = n end
    assert.is_true(#names > 3)
    assert.equal(names[1], names[#names])
    assert.equal(first.name, names[1])
    for k = 1, #names - 1 do
      local depends = false
      for _, d in ipairs(tbl.services[index[names[k]]].depends) do depends = depends or d == names[k + 1] end
      assert.is_true(depends)
    end
  end)

  it("reports 10,000 unknown dependencies, hints for the first ones", function()
    local tbl = assert(load(source))()
    for _, entry in ipairs(tbl.services) do entry.depends = { entry.name .. "x" } end
    local result, problems = services.validate(tbl, "services.lua")
    assert.is_true(result == nil)
    assert.equal(COUNT, #problems)
    assert.matches('names unknown service "s00001x" (did you mean "s00001"?)', problems[1], 1, true)
    assert.is_nil(problems[COUNT]:find("did you mean", 1, true))
  end)

  it("walks a chain of 150,000 without running out of stack", function()
    local chain = {}
    for i = 1, 150000 do chain[i] = { name = "c" .. i, depends = { "c" .. (i + 1) } } end
    chain[150000].depends = {}
    assert.same({}, dag.find_cycles(chain))
    chain[150000].depends = { "c1" }
    local cycles = dag.find_cycles(chain)
    assert.equal(1, #cycles)
    assert.equal(150001, #cycles[1])
    assert.same({ "c1", "c2", "c3" }, { table.unpack(cycles[1], 1, 3) })
    assert.same({ "c150000", "c1" }, { table.unpack(cycles[1], 150000, 150001) })
  end)
end)
