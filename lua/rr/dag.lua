-- rr.dag: dependency ordering of services.
--
-- A service here is any table with a `name` (string) and an optional `depends`
-- (list of names): the normalized services of rr.services, or plain tables in a
-- spec. The list's order is the declaration order, which breaks every tie, so
-- that the same file always gives the same plan.
--
-- Direction: `a.depends = { "b" }` means b must be restarted (and healthy)
-- before a. A printed cycle follows that direction: "a -> b -> a" reads
-- "a depends on b, which depends on a".

local suggest = require("rr.suggest")

local dag = {}

-- Checks the argument shape; misuse raises at the caller.
local function check_services(services, level)
  if type(services) ~= "table" then
    error("rr.dag: services must be a list of services, got " .. type(services), level + 1)
  end
  for i, svc in ipairs(services) do
    if type(svc) ~= "table" or type(svc.name) ~= "string" then
      error(("rr.dag: services[%d] must be a table with a string name"):format(i), level + 1)
    end
    if svc.depends ~= nil and type(svc.depends) ~= "table" then
      error(("rr.dag: services[%d].depends must be a list of names"):format(i), level + 1)
    end
  end
end

-- Maps each name to its declaration index (the first one when a name repeats).
local function index_names(services)
  local index_of = {}
  for i, svc in ipairs(services) do
    if index_of[svc.name] == nil then index_of[svc.name] = i end
  end
  return index_of
end

-- The dependency indexes of every service, deduplicated, in declared order.
-- Unknown names are left out: the callers that care report them first.
local function dependency_indexes(services, index_of)
  local deps = {}
  for i, svc in ipairs(services) do
    local list, seen = {}, {}
    for _, dep_name in ipairs(svc.depends or {}) do
      local j = index_of[dep_name]
      if j and not seen[j] then
        seen[j] = true
        list[#list + 1] = j
      end
    end
    deps[i] = list
  end
  return deps
end

-- The first structural problem that makes ordering impossible, or nil.
local function structural_error(services, index_of)
  for i, svc in ipairs(services) do
    if index_of[svc.name] ~= i then
      return ("duplicate service name %q"):format(svc.name)
    end
  end
  for _, svc in ipairs(services) do
    for _, dep_name in ipairs(svc.depends or {}) do
      if index_of[dep_name] == nil then
        return ("service %q depends on unknown service %q"):format(svc.name, tostring(dep_name))
      end
    end
  end
  return nil
end

-- Strongly connected components (Tarjan), each as a list of indexes.
local function strongly_connected(count, deps)
  local next_number, number, low = 0, {}, {}
  local stack, on_stack, components = {}, {}, {}

  local function visit(v)
    next_number = next_number + 1
    number[v], low[v] = next_number, next_number
    stack[#stack + 1] = v
    on_stack[v] = true
    for _, w in ipairs(deps[v]) do
      if number[w] == nil then
        visit(w)
        if low[w] < low[v] then low[v] = low[w] end
      elseif on_stack[w] and number[w] < low[v] then
        low[v] = number[w]
      end
    end
    if low[v] == number[v] then
      local component = {}
      repeat
        local w = table.remove(stack)
        on_stack[w] = nil
        component[#component + 1] = w
      until w == v
      components[#components + 1] = component
    end
  end

  for v = 1, count do
    if number[v] == nil then visit(v) end
  end
  return components
end

-- The shortest cycle through `start` inside one component, as indexes with
-- `start` at both ends. Breadth-first in declared dependency order, so the
-- cycle printed for a given file never changes.
local function cycle_through(start, members, deps)
  local parent, queue, head = {}, { start }, 1
  while queue[head] do
    local v = queue[head]
    head = head + 1
    for _, w in ipairs(deps[v]) do
      if w == start then
        local path = { start }
        local u = v
        while u ~= start do
          table.insert(path, 2, u)
          u = parent[u]
        end
        path[#path + 1] = start
        return path
      end
      if members[w] and parent[w] == nil then
        parent[w] = v
        queue[#queue + 1] = w
      end
    end
  end
  return nil -- unreachable for a real component
end

-- Every dependency cycle: one per group of services that depend on each other
-- (a strongly connected component), starting at its first declared service.
-- Returns a list of cycles, each a list of names with the first name repeated
-- at the end; a self dependency is { "a", "a" }. Unknown dependencies are
-- ignored (they cannot form a cycle).
function dag.find_cycles(services)
  check_services(services, 2)
  local index_of = index_names(services)
  local deps = dependency_indexes(services, index_of)
  local cycles = {}
  for _, component in ipairs(strongly_connected(#services, deps)) do
    local start, members = math.huge, {}
    for _, v in ipairs(component) do
      members[v] = true
      if v < start then start = v end
    end
    local path = cycle_through(start, members, deps)
    if path then
      local names = {}
      for k, v in ipairs(path) do names[k] = services[v].name end
      cycles[#cycles + 1] = { first = start, names = names }
    end
  end
  table.sort(cycles, function(a, b) return a.first < b.first end)
  for k, cycle in ipairs(cycles) do cycles[k] = cycle.names end
  return cycles
end

-- The first dependency cycle (see find_cycles), or nil when there is none.
function dag.find_cycle(services)
  check_services(services, 2)
  return dag.find_cycles(services)[1]
end

-- Formats a cycle for a message: "a -> b -> a".
function dag.format_cycle(cycle)
  return table.concat(cycle, " -> ")
end

-- Close matches for a mistyped name, for "did you mean" hints.
local function suggestion(services, name)
  local names = {}
  for i, svc in ipairs(services) do names[i] = svc.name end
  local best = suggest.closest(name, names)
  return best and (" (did you mean %q?)"):format(best) or ""
end

-- Resolves a selection (list of names, or nil for all) to a set of indexes.
local function selection_set(services, index_of, selected, level)
  if selected == nil then return nil end
  if type(selected) ~= "table" then
    error("rr.dag: selection must be a list of names or nil, got " .. type(selected), level + 1)
  end
  local set = {}
  for _, name in ipairs(selected) do
    if type(name) ~= "string" then
      error("rr.dag: selection must be a list of names, found a " .. type(name), level + 1)
    end
    local i = index_of[name]
    if i == nil then
      return nil, ("unknown service %q%s"):format(name, suggestion(services, name))
    end
    set[i] = true
  end
  return set
end

-- The restart order: dependencies first, ties broken by declaration order
-- (Kahn's algorithm that always takes the ready service declared first).
-- With `selected` (a list of names), only those services, in the same relative
-- order: dependencies among them are respected, also through unselected
-- services in between, and unselected services are not pulled in.
-- Returns the list of service tables, or nil, err (unknown selected name,
-- unknown dependency, duplicate name, dependency cycle).
function dag.order(services, selected)
  check_services(services, 2)
  local index_of = index_names(services)
  local problem = structural_error(services, index_of)
  if problem then return nil, problem end
  local wanted, err = selection_set(services, index_of, selected, 2)
  if err then return nil, err end

  local deps = dependency_indexes(services, index_of)
  local remaining, dependents_of = {}, {}
  for i = 1, #services do dependents_of[i] = {} end
  for i = 1, #services do
    remaining[i] = #deps[i]
    for _, j in ipairs(deps[i]) do
      local list = dependents_of[j]
      list[#list + 1] = i
    end
  end

  -- `ready` stays sorted by index; n is at most a few hundred, so a sorted
  -- insert is simpler than a heap and fast enough.
  local ready = {}
  local function make_ready(i)
    local k = #ready + 1
    while k > 1 and ready[k - 1] > i do
      ready[k] = ready[k - 1]
      k = k - 1
    end
    ready[k] = i
  end
  for i = 1, #services do
    if remaining[i] == 0 then make_ready(i) end
  end

  local ordered = {}
  local placed = 0
  while #ready > 0 do
    local i = table.remove(ready, 1)
    placed = placed + 1
    if wanted == nil or wanted[i] then ordered[#ordered + 1] = services[i] end
    for _, d in ipairs(dependents_of[i]) do
      remaining[d] = remaining[d] - 1
      if remaining[d] == 0 then make_ready(d) end
    end
  end
  if placed < #services then
    return nil, "dependency cycle: " .. dag.format_cycle(dag.find_cycle(services))
  end
  return ordered
end

-- Every service that depends on `name`, directly or through others: what
-- `--continue-on-error` skips when `name` fails. Returns a list of names in
-- declaration order (without `name` itself), or nil, err for an unknown name.
function dag.dependents(services, name)
  check_services(services, 2)
  if type(name) ~= "string" then
    error("rr.dag: name must be a string, got " .. type(name), 2)
  end
  local index_of = index_names(services)
  local root = index_of[name]
  if root == nil then
    return nil, ("unknown service %q%s"):format(name, suggestion(services, name))
  end
  local deps = dependency_indexes(services, index_of)
  local reached = { [root] = true }
  -- Grow the set until no service has a dependency inside it and is not in it;
  -- declaration order does not matter for a fixed point.
  local grew = true
  while grew do
    grew = false
    for i = 1, #services do
      if not reached[i] then
        for _, j in ipairs(deps[i]) do
          if reached[j] then
            reached[i], grew = true, true
            break
          end
        end
      end
    end
  end
  local names = {}
  for i = 1, #services do
    if reached[i] and i ~= root then names[#names + 1] = services[i].name end
  end
  return names
end

-- For each selected service, the selected services it must wait for: its
-- dependencies, looking through unselected services to the selected ones
-- behind them (the same rule as dag.order's selection). Returns a map from
-- index to a list of indexes.
local function selected_prerequisites(services, deps, wanted)
  local memo = {}
  local function ancestors(i)
    if memo[i] then return memo[i] end
    local set = {}
    memo[i] = set -- callers have rejected cycles, so this never loops
    for _, j in ipairs(deps[i]) do
      set[j] = true
      for k in pairs(ancestors(j)) do set[k] = true end
    end
    return set
  end
  local prerequisites = {}
  for i = 1, #services do
    if wanted == nil or wanted[i] then
      local list = {}
      for j in pairs(ancestors(i)) do
        if wanted == nil or wanted[j] then list[#list + 1] = j end
      end
      table.sort(list)
      prerequisites[i] = list
    end
  end
  return prerequisites
end

-- Everything a scheduler needs, computed once: the order and, per selected
-- service, its selected prerequisites.
local function prepare(services, selected, level)
  local ordered, err = dag.order(services, selected)
  if not ordered then return nil, err end
  local index_of = index_names(services)
  local wanted = selection_set(services, index_of, selected, level + 1)
  return {
    services = services,
    ordered = ordered,
    index_of = index_of,
    prerequisites = selected_prerequisites(services, dependency_indexes(services, index_of), wanted),
  }
end

-- The services of a prepared plan that can start now (see dag.ready).
local function ready_now(plan, done, started)
  local ready = {}
  for _, svc in ipairs(plan.ordered) do
    if not started[svc.name] and not done[svc.name] then
      local waiting = false
      for _, j in ipairs(plan.prerequisites[plan.index_of[svc.name]]) do
        if not done[plan.services[j].name] then
          waiting = true
          break
        end
      end
      if not waiting then ready[#ready + 1] = svc end
    end
  end
  return ready
end

local function check_sets(done, started, level)
  if type(done) ~= "table" or (started ~= nil and type(started) ~= "table") then
    error("rr.dag: done and started must be sets of names (name -> true)", level + 1)
  end
end

-- What can start now, for a runner with `--parallel N`: the selected services
-- (all when `selected` is nil) not yet started whose selected prerequisites are
-- all done. `done` is a set of names (name -> true) that finished successfully;
-- `started` (optional) is a set of names already started in any way (in
-- flight, done, failed, skipped), which are never returned. A service whose
-- prerequisite failed never becomes ready: the runner skips it (and reports
-- it) through dag.dependents.
-- Returns a list of service tables in restart order, or nil, err as dag.order.
function dag.ready(services, selected, done, started)
  check_services(services, 2)
  check_sets(done, started, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  return ready_now(plan, done, started or done)
end

-- dag.ready with the order computed once, for a runner that asks after every
-- finished service: returns an object with `scheduler:ready(done, started)`
-- (same arguments and result as dag.ready) and `scheduler.ordered` (the
-- dag.order list), or nil, err as dag.order.
function dag.scheduler(services, selected)
  check_services(services, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  return {
    ordered = plan.ordered,
    ready = function(_, done, started)
      check_sets(done, started, 2)
      return ready_now(plan, done, started or done)
    end,
  }
end

-- The restart order grouped in waves for display (`--dry-run --parallel N`):
-- wave 1 holds the services with no selected prerequisite, wave k those whose
-- prerequisites are all in earlier waves, the last one at wave k - 1. Within a
-- wave, restart order. Returns a list of lists of service tables, or nil, err
-- as dag.order.
function dag.layers(services, selected)
  check_services(services, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  local wave_of, layers = {}, {}
  -- plan.ordered puts every prerequisite before its dependents.
  for _, svc in ipairs(plan.ordered) do
    local i = plan.index_of[svc.name]
    local wave = 1
    for _, j in ipairs(plan.prerequisites[i]) do
      if wave_of[j] + 1 > wave then wave = wave_of[j] + 1 end
    end
    wave_of[i] = wave
    layers[wave] = layers[wave] or {}
    table.insert(layers[wave], svc)
  end
  return layers
end

return dag
