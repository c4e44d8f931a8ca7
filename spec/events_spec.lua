-- rr.events: the run's event stream. The log line is written and the view called inside emit;
-- on_event hooks get the events through a bounded queue, in order, from one task per stream,
-- so that a slow hook never holds the run and a stream keeps nothing it no longer needs.
local rr = require("rr")
local fs = require("rr.fs")
local cjson = require("cjson")
local events = require("rr.events")
local hooks = require("rr.hooks")
local helpers = require("spec.support.helpers")

-- The events of a JSONL log, decoded.
local function logged(path)
  local out = {}
  for line in (fs.read(path) or ""):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(line) end
  return out
end

local function count(list, name)
  local n = 0
  for _, ev in ipairs(list) do
    if ev.event == name then n = n + 1 end
  end
  return n
end

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

describe("rr.events", function()
  local dir
  before_each(function() dir = assert(fs.mkdtemp("/tmp/rr-events-spec-")) end)
  after_each(function()
    _G.RR_EVENTS_SPEC = nil
    fs.remove_tree(dir)
  end)

  -- A hook set whose on_event is `body` (Lua source of a function(ev)); what it records goes
  -- into the global RR_EVENTS_SPEC.seen (a hook script is a file: this is how one reaches the spec).
  local function hook_set(body)
    _G.RR_EVENTS_SPEC = { seen = {} }
    local path = helpers.write(dir .. "/hook.lua", "local rr = require('rr')\nreturn { on_event = " .. body .. " }\n")
    return hooks.set({ assert(hooks.load(path)) })
  end

  it("does not keep the events it emitted (memory stays flat for a long run)", function()
    local stream = assert(events.open({ path = dir .. "/events.jsonl" }))
    local weak = setmetatable({}, { __mode = "v" })
    for i = 1, 100 do weak[i] = stream:emit("MIGRATION_OUTPUT", { line = ("line %d"):format(i) }) end
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(weak), "the stream still holds the events it emitted")
    stream:close()
    assert.equal(100, #logged(dir .. "/events.jsonl"))
  end)

  it("writes the log line and calls the view inside emit; a slow on_event hook does not hold emit", function()
    local set = hook_set("function(ev) rr.sleep(0.05); table.insert(RR_EVENTS_SPEC.seen, ev.i) end")
    local viewed = {}
    local stream = assert(events.open({ path = dir .. "/events.jsonl", hooks = set,
      view = function(ev) viewed[#viewed + 1] = ev.i end }))
    for i = 1, 10 do stream:emit("STEP", { i = i }) end
    -- nothing between the emits let the loop run: a hook that emit waited for would have run
    assert.same({}, RR_EVENTS_SPEC.seen)
    assert.same(range(10), viewed)
    assert.equal(10, #logged(dir .. "/events.jsonl"))
    stream:close()
    assert.same(range(10), RR_EVENTS_SPEC.seen)
  end)

  it("hands events to on_event in emission order, even from many tasks and with a hook that waits", function()
    -- like migration output: one task per line, each emitting its event
    local set = hook_set("function(ev) rr.sleep(0.002 * (ev.i % 4)); table.insert(RR_EVENTS_SPEC.seen, ev.i) end")
    local stream = assert(events.open({ hooks = set }))
    local tasks = {}
    for i = 1, 40 do tasks[i] = rr.spawn(function() stream:emit("MIGRATION_OUTPUT", { i = i }) end) end
    for _, r in ipairs(rr.wait(tasks)) do assert.is_true(r[1], r[2]) end
    stream:close()
    assert.same(range(40), RR_EVENTS_SPEC.seen)
  end)

  it("gives a service's own hooks that service's events, after the run's hooks, in order", function()
    local run_set = hook_set("function(ev) table.insert(RR_EVENTS_SPEC.seen, 'run ' .. ev.event) end")
    local own_path = helpers.write(dir .. "/own.lua",
      "return { on_event = function(ev) table.insert(RR_EVENTS_SPEC.seen, 'own ' .. ev.event) end }\n")
    local own = hooks.set({ assert(hooks.load(own_path)) })
    local stream = assert(events.open({ hooks = run_set,
      service_hooks = function(name) return name == "api" and own or nil end }))
    stream:emit("PLAN_START", {})
    stream:emit("SERVICE_RESTART_START", { service = "api" })
    stream:emit("SERVICE_RESTART_START", { service = "db" })
    stream:close()
    assert.same({ "run PLAN_START", "run SERVICE_RESTART_START", "own SERVICE_RESTART_START",
      "run SERVICE_RESTART_START" }, RR_EVENTS_SPEC.seen)
  end)

  it("logs a hook that raises as HOOK_FAILED, and goes on with the next event", function()
    local set = hook_set([[function(ev)
      if ev.i == 2 then error("webhook down on purpose") end
      table.insert(RR_EVENTS_SPEC.seen, ev.i)
    end]])
    local stream = assert(events.open({ path = dir .. "/events.jsonl", hooks = set }))
    for i = 1, 3 do stream:emit("STEP", { i = i }) end
    stream:close()
    assert.same({ 1, 3 }, RR_EVENTS_SPEC.seen)
    local log = logged(dir .. "/events.jsonl")
    assert.equal(1, count(log, "HOOK_FAILED"))
    for _, ev in ipairs(log) do
      if ev.event == "HOOK_FAILED" then
        assert.equal("on_event", ev.hook)
        assert.matches("webhook down on purpose", ev.error)
      end
    end
  end)

  it("drops what does not fit in its queue for the hooks, never blocking emit, and says how many", function()
    local set = hook_set("function(ev) table.insert(RR_EVENTS_SPEC.seen, ev.i) end")
    local stream = assert(events.open({ path = dir .. "/events.jsonl", hooks = set }))
    local n = events.HOOK_QUEUE + 500
    for i = 1, n do stream:emit("MIGRATION_OUTPUT", { i = i }) end
    stream:close()
    -- the first HOOK_QUEUE made it, in order; the log has every one of them
    assert.same(range(events.HOOK_QUEUE), RR_EVENTS_SPEC.seen)
    local log = logged(dir .. "/events.jsonl")
    assert.equal(n, count(log, "MIGRATION_OUTPUT"))
    local last = log[#log]
    assert.equal("WARNING", last.event)
    assert.equal(500, last.dropped)
    assert.equal("500 events dropped for on_event hooks (more than 1000 waiting)", last.warning)
  end)

  it("tells the hooks about events dropped earlier, once they caught up", function()
    local set = hook_set("function(ev) table.insert(RR_EVENTS_SPEC.seen, ev.warning or ev.i) end")
    local stream = assert(events.open({ hooks = set }))
    for i = 1, events.HOOK_QUEUE + 3 do stream:emit("MIGRATION_OUTPUT", { i = i }) end
    -- a wait lets the hooks' task catch up before the run ends
    local deadline = rr.now() + 30
    while #RR_EVENTS_SPEC.seen <= events.HOOK_QUEUE and rr.now() < deadline do rr.sleep(0.01) end
    stream:close()
    assert.equal(events.HOOK_QUEUE + 1, #RR_EVENTS_SPEC.seen)
    assert.equal("3 events dropped for on_event hooks (more than 1000 waiting)", RR_EVENTS_SPEC.seen[events.HOOK_QUEUE + 1])
  end)

  it("close() waits for the hooks within a bound, then counts what was not delivered", function()
    local set = hook_set("function(ev) table.insert(RR_EVENTS_SPEC.seen, ev.i); rr.sleep(3600) end")
    set.timeout = 1 -- the hung call itself ends here, after close gave up on it
    local stream = assert(events.open({ path = dir .. "/events.jsonl", hooks = set, drain_timeout = 0.2 }))
    for i = 1, 3 do stream:emit("STEP", { i = i }) end
    stream:close()
    assert.same({ 1 }, RR_EVENTS_SPEC.seen)
    local log = logged(dir .. "/events.jsonl")
    assert.equal("WARNING", log[#log].event)
    assert.equal("2 events dropped for on_event hooks (not delivered when the stream closed)", log[#log].warning)
  end)
end)
