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
--
-- Cost: every function here is O(N + E) or O((N + E) log N) in the number of
-- services and dependencies (a platform may be generated with thousands of
-- services), and so is a whole run of a scheduler (see dag.scheduler).

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

-- The reverse edges: for each index, the indexes that depend on it directly,
-- in declaration order.
local function dependents_lists(count, deps)
  local dependents_of = {}
  for i = 1, count do dependents_of[i] = {} end
  for i = 1, count do
    for _, j in ipairs(deps[i]) do
      local list = dependents_of[j]
      list[#list + 1] = i
    end
  end
  return dependents_of
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

-- A binary min-heap of integers in a plain array.
local function heap_push(heap, x)
  local k = #heap + 1
  while k > 1 do
    local parent = k // 2
    if heap[parent] <= x then break end
    heap[k] = heap[parent]
    k = parent
  end
  heap[k] = x
end

local function heap_pop(heap)
  local n = #heap
  local top, last = heap[1], heap[n]
  heap[n] = nil
  n = n - 1
  if n > 0 then
    local k = 1
    while true do
      local child = 2 * k
      if child > n then break end
      if child < n and heap[child + 1] < heap[child] then child = child + 1 end
      if last <= heap[child] then break end
      heap[k] = heap[child]
      k = child
    end
    heap[k] = last
  end
  return top
end

-- Kahn's algorithm over every service: a list of indexes, dependencies first.
-- With `by_declaration`, the ready service declared first always goes next (a
-- heap); without, any topological order (a queue). Shorter than the count when
-- there is a cycle.
local function topological(count, deps, dependents_of, by_declaration)
  local remaining, ready, head = {}, {}, 1
  for i = 1, count do
    remaining[i] = #deps[i]
    if remaining[i] == 0 then ready[#ready + 1] = i end -- increasing: already a heap
  end
  local order = {}
  while true do
    local i
    if by_declaration then
      if #ready == 0 then break end
      i = heap_pop(ready)
    else
      i = ready[head]
      if i == nil then break end
      head = head + 1
    end
    order[#order + 1] = i
    for _, d in ipairs(dependents_of[i]) do
      remaining[d] = remaining[d] - 1
      if remaining[d] == 0 then
        if by_declaration then heap_push(ready, d) else ready[#ready + 1] = d end
      end
    end
  end
  return order
end

-- Strongly connected components (Tarjan), each as a list of indexes. The
-- depth-first walk keeps its own stack: a chain of 100,000 services must not
-- overflow Lua's.
local function strongly_connected(count, deps)
  local counter, number, low = 0, {}, {}
  local stack, on_stack, components = {}, {}, {}
  local walk_vertex, walk_edge = {}, {} -- the walk: a vertex and its next dependency

  local function enter(v, depth)
    counter = counter + 1
    number[v], low[v] = counter, counter
    stack[#stack + 1] = v
    on_stack[v] = true
    walk_vertex[depth], walk_edge[depth] = v, 1
  end

  for root = 1, count do
    if number[root] == nil then
      local depth = 1
      enter(root, depth)
      while depth > 0 do
        local v = walk_vertex[depth]
        local k = walk_edge[depth]
        local w = deps[v][k]
        if w ~= nil then
          walk_edge[depth] = k + 1
          if number[w] == nil then
            depth = depth + 1
            enter(w, depth)
          elseif on_stack[w] and number[w] < low[v] then
            low[v] = number[w]
          end
        else
          if low[v] == number[v] then
            local component = {}
            repeat
              local w2 = stack[#stack]
              stack[#stack] = nil
              on_stack[w2] = nil
              component[#component + 1] = w2
            until w2 == v
            components[#components + 1] = component
          end
          depth = depth - 1
          if depth > 0 then
            local parent = walk_vertex[depth]
            if low[v] < low[parent] then low[parent] = low[v] end
          end
        end
      end
    end
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
        local back = {} -- v, its parent, ..., the first step after start
        local u = v
        while u ~= start do
          back[#back + 1] = u
          u = parent[u]
        end
        local path = { start }
        for k = #back, 1, -1 do path[#path + 1] = back[k] end
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
    local path
    if #component > 1 then
      local start, members = math.huge, {}
      for _, v in ipairs(component) do
        members[v] = true
        if v < start then start = v end
      end
      path = cycle_through(start, members, deps)
    else
      local v = component[1]
      for _, w in ipairs(deps[v]) do
        if w == v then path = { v, v } end
      end
    end
    if path then
      local names = {}
      for k, v in ipairs(path) do names[k] = services[v].name end
      cycles[#cycles + 1] = { first = path[1], names = names }
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

-- Everything ordering and scheduling need, computed once: the graph, the order
-- of every service (`order`, indexes) and of the selected ones (`ordered`,
-- service tables; `position[i]` is i's place in it), or nil, err (unknown
-- selected name, unknown dependency, duplicate name, dependency cycle).
local function prepare(services, selected, level)
  local index_of = index_names(services)
  local problem = structural_error(services, index_of)
  if problem then return nil, problem end
  local wanted, err = selection_set(services, index_of, selected, level + 1)
  if err then return nil, err end
  local count = #services
  local deps = dependency_indexes(services, index_of)
  local dependents_of = dependents_lists(count, deps)
  local order = topological(count, deps, dependents_of, true)
  if #order < count then
    return nil, "dependency cycle: " .. dag.format_cycle(dag.find_cycle(services))
  end
  local ordered, position = {}, {}
  for _, i in ipairs(order) do
    if wanted == nil or wanted[i] then
      ordered[#ordered + 1] = services[i]
      position[i] = #ordered
    end
  end
  return {
    services = services, index_of = index_of, deps = deps, dependents_of = dependents_of,
    order = order, wanted = wanted, ordered = ordered, position = position,
  }
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
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  return plan.ordered
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
  local dependents_of = dependents_lists(#services, dependency_indexes(services, index_of))
  local reached, queue, head = { [root] = true }, { root }, 1
  while queue[head] do
    for _, d in ipairs(dependents_of[queue[head]]) do
      if not reached[d] then
        reached[d] = true
        queue[#queue + 1] = d
      end
    end
    head = head + 1
  end
  local names = {}
  for i = 1, #services do
    if reached[i] and i ~= root then names[#names + 1] = services[i].name end
  end
  return names
end

-- For every service behind a failed one, the failed service that blocks it:
-- what a runner names when it skips a service ("depends on X, which failed"),
-- computed for all services at once. `failed` is a list of names (a service
-- behind several gets the earliest in the list) or a set (name -> true; then
-- the first declared). A failed service behind another failed one is in the map
-- too. Dependencies count through every service, whatever was selected.
-- Returns a map name -> failed name (services not blocked are absent), or
-- nil, err for an unknown failed name or as dag.order (duplicate name, unknown
-- dependency, dependency cycle).
function dag.blocked_by(services, failed)
  check_services(services, 2)
  if type(failed) ~= "table" then
    error("rr.dag: failed must be a list or a set of names, got " .. type(failed), 2)
  end
  local index_of = index_names(services)
  local problem = structural_error(services, index_of)
  if problem then return nil, problem end
  -- rank[i]: lower wins; nil when i did not fail.
  local rank = {}
  local function mark(name, value)
    if type(name) ~= "string" then
      error("rr.dag: failed must be a list or a set of names, found a " .. type(name), 3)
    end
    local i = index_of[name]
    if i == nil then return nil, ("unknown service %q%s"):format(name, suggestion(services, name)) end
    if rank[i] == nil then rank[i] = value or i end
    return true
  end
  if failed[1] ~= nil then
    for k, name in ipairs(failed) do
      local ok, err = mark(name, k)
      if not ok then return nil, err end
    end
  else
    for name, flag in pairs(failed) do
      if flag then
        local ok, err = mark(name)
        if not ok then return nil, err end
      end
    end
  end
  local count = #services
  local deps = dependency_indexes(services, index_of)
  local order = topological(count, deps, dependents_lists(count, deps), false)
  if #order < count then
    return nil, "dependency cycle: " .. dag.format_cycle(dag.find_cycle(services))
  end
  -- blocker[i]: the best-ranked failed service strictly behind i. Dependencies
  -- come first in `order`, so theirs are known when i is reached.
  local blocker, blocked = {}, {}
  for _, i in ipairs(order) do
    local best
    for _, j in ipairs(deps[i]) do
      local candidate = blocker[j]
      if rank[j] and (candidate == nil or rank[j] < rank[candidate]) then candidate = j end
      if candidate and (best == nil or rank[candidate] < rank[best]) then best = candidate end
    end
    if best then
      blocker[i] = best
      blocked[services[i].name] = services[best].name
    end
  end
  return blocked
end

local function check_sets(done, started, level)
  if type(done) ~= "table" or (started ~= nil and type(started) ~= "table") then
    error("rr.dag: done and started must be sets of names (name -> true)", level + 1)
  end
end

local function check_limit(limit, level)
  if limit ~= nil and (math.tointeger(limit) == nil or limit < 0) then
    error("rr.dag: limit must be an integer >= 0 or nil, got " .. tostring(limit), level + 1)
  end
end

-- The running state of a scheduler over a prepared plan. A selected service is
-- settled once it is done and everything behind it is settled; an unselected one
-- once everything behind it is (at once, nothing runs it). A selected service
-- whose dependencies are all settled is open: ready unless it was started.
-- Settling walks each dependency edge once, so a whole run costs O(N + E)
-- plus a heap operation per service handed out.
local function new_state(plan)
  local services, deps, dependents_of = plan.services, plan.deps, plan.dependents_of
  local wanted, position, ordered = plan.wanted, plan.position, plan.ordered
  local remaining = {}  -- per index: dependencies not settled yet
  local open = {}       -- heap of positions in `ordered`: open, not seen started
  local running = {}    -- indexes seen started and not yet seen done

  local function settle(i)
    local pending = { i }
    while #pending > 0 do
      local v = pending[#pending]
      pending[#pending] = nil
      for _, d in ipairs(dependents_of[v]) do
        remaining[d] = remaining[d] - 1
        if remaining[d] == 0 then
          if wanted == nil or wanted[d] then heap_push(open, position[d]) else pending[#pending + 1] = d end
        end
      end
    end
  end

  local free = {}
  for i = 1, #services do
    remaining[i] = #deps[i]
    if remaining[i] == 0 then free[#free + 1] = i end
  end
  for _, i in ipairs(free) do
    if wanted == nil or wanted[i] then heap_push(open, position[i]) else settle(i) end
  end

  -- See dag.scheduler. `done` and `started` only grow between calls (as in a
  -- run): a service is looked at when it is open and first in restart order (a
  -- service found started then is watched until it is done), so every one a
  -- call returns is one dag.ready would return, in the same order.
  return function(done, started, limit)
    local still = {}
    for _, i in ipairs(running) do
      if done[services[i].name] then settle(i) else still[#still + 1] = i end
    end
    running = still
    local ready, held = {}, {}
    while #open > 0 and (limit == nil or #ready < limit) do
      local p = heap_pop(open)
      local svc = ordered[p]
      if done[svc.name] then
        settle(plan.index_of[svc.name]) -- its dependents come later in `ordered`
      elseif started[svc.name] then
        running[#running + 1] = plan.index_of[svc.name]
      else
        held[#held + 1] = p
        ready[#ready + 1] = svc
      end
    end
    if #open == 0 then
      open = held -- increasing, so already a heap: no limit costs no pushes back
    else
      for _, p in ipairs(held) do heap_push(open, p) end
    end
    return ready
  end
end

-- What can start now, for a runner with `--parallel N`: the selected services
-- (all when `selected` is nil) not yet started whose selected prerequisites are
-- all done. `done` is a set of names (name -> true) that finished successfully;
-- `started` (optional) is a set of names already started in any way (in
-- flight, done, failed, skipped), which are never returned. A service whose
-- prerequisite failed never becomes ready: the runner skips it (and reports
-- it, see dag.blocked_by). A prerequisite is a selected service the service
-- depends on, directly or through others (selected or not).
-- Returns a list of service tables in restart order, or nil, err as dag.order.
function dag.ready(services, selected, done, started)
  check_services(services, 2)
  check_sets(done, started, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  return new_state(plan)(done, started or done)
end

-- dag.ready for a runner that asks after every finished service, with the
-- order computed once: returns an object with `scheduler.ordered` (the
-- dag.order list) and `scheduler:ready(done, started[, limit])`: the same
-- arguments and result as dag.ready, only the first `limit` services (the
-- runner's free slots) when given. It is incremental, so `done` and `started`
-- must only grow from one call to the next (as in a run; the same tables or
-- not). A whole run with a limit costs O((N + E) log N), plus for each call the
-- services started and not done (in flight, and the failed ones); without a
-- limit, each call also costs the services it returns. Returns nil, err as
-- dag.order.
function dag.scheduler(services, selected)
  check_services(services, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  local ready = new_state(plan)
  return {
    ordered = plan.ordered,
    ready = function(_, done, started, limit)
      check_sets(done, started, 2)
      check_limit(limit, 2)
      return ready(done, started or done, limit)
    end,
  }
end

-- The longest remaining dependency chain of each selected service: how many selected services
-- (itself included) lie on the longest path from it through its dependents. The scheduler
-- starts the ready service with the longest chain first, so the critical path never waits
-- behind a leaf. Returns { [name] = length }, or nil, err as dag.order. O(N + E).
function dag.chain_lengths(services, selected)
  check_services(services, 2)
  local plan, err = prepare(services, selected, 2)
  if not plan then return nil, err end
  local chain, out = {}, {}
  for k = #plan.order, 1, -1 do
    local i = plan.order[k]
    local longest = 0
    for _, j in ipairs(plan.dependents_of[i]) do
      if chain[j] > longest then longest = chain[j] end
    end
    local own = (plan.wanted == nil or plan.wanted[i]) and 1 or 0
    chain[i] = longest + own
    if own == 1 then out[services[i].name] = chain[i] end
  end
  return out
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
  -- behind[i]: the last wave at or behind i (0: no selected service there).
  -- plan.order puts every dependency before its dependents.
  local behind, wave_of = {}, {}
  for _, i in ipairs(plan.order) do
    local last = 0
    for _, j in ipairs(plan.deps[i]) do
      if behind[j] > last then last = behind[j] end
    end
    if plan.wanted == nil or plan.wanted[i] then
      wave_of[i] = last + 1
      last = last + 1
    end
    behind[i] = last
  end
  local layers = {}
  for _, svc in ipairs(plan.ordered) do
    local wave = wave_of[plan.index_of[svc.name]]
    layers[wave] = layers[wave] or {}
    table.insert(layers[wave], svc)
  end
  return layers
end

return dag
