-- The live view of a platform on several hosts: each line about a service starts with its
-- host in an aligned column, the counts go per host ("h1 1/2, db-primary 0/1, local 0/1"), and
-- a platform on this machine alone looks as it always did. rr.ui fed the events a run emits,
-- its output read back from a file.
--
--   spec/support/run-specs ./rrengine spec/ui_hosts_spec.lua
local fs = require("rr.fs")
local ui = require("rr.ui")

describe("rr.ui with services on several hosts", function()
  local dir
  setup(function() dir = assert(fs.mkdtemp("/tmp/rr-ui-hosts-")) end)
  teardown(function() fs.remove_tree(dir) end)

  -- A view writing into a file; run(view) drives it; returns what it wrote, without the clock.
  local function output(opts, run)
    local path = dir .. "/out"
    local out = assert(io.open(path, "w"))
    local view = ui.new({ out = out, live = opts.live or false })
    run(view)
    out:close()
    local text = assert(fs.read(path))
    fs.remove(path)
    return (text:gsub("%d%d:%d%d:%d%d%.%d%d%d  ", ""))
  end

  local svcs = {
    { name = "db", host = "h1" }, { name = "api", host = "db-primary" }, { name = "jobs", host = "h1" },
    { name = "web" },
  }
  local function hosts_of(list)
    local m = {}
    for _, s in ipairs(list) do m[s.name] = s.host end
    return m
  end
  local order = { "db", "api", "jobs", "web" }

  local function play(view, list)
    view:begin({ order = order, parallel = 1, hosts = hosts_of(list) })
    view:event({ event = "PLAN_START", order = order })
    view:step(list[1], "restart")
    view:event({ event = "SERVICE_RESTART_SUCCESS", service = "db", method = "restart", duration_ms = 1200 })
    view:step(list[2], "migrate")
    view:event({ event = "SERVICE_RESTART_FAILED", service = "api", error = "unhealthy", rolled_back = true })
    view:step(list[3], "restart")
    view:event({ event = "SERVICE_RESTART_SUCCESS", service = "jobs", method = "restart", duration_ms = 900 })
    view:event({ event = "SERVICE_SKIPPED", service = "web", reason = "api failed" })
  end

  it("starts each line about a service with its host, in a column, and counts per host", function()
    local text = output({}, function(view) play(view, svcs) end)
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    -- the plan's line is about no service: no column
    assert.equal("plan: 4 service(s) in order: db, api, jobs, web", lines[1])
    -- the column is as wide as the longest host name, this machine's services say "local"
    assert.equal(("%-10s  %-24s %s"):format("h1", "db", "restart"), lines[2])
    assert.matches("^h1          ✔ db%s+restart ok %(1%.2 s%)  %[1/4, h1 1/2%]$", lines[3])
    assert.equal(("%-10s  %-24s %s"):format("db-primary", "api", "migrate"), lines[4])
    assert.matches("^db%-primary  ✘ api%s+failed: unhealthy %[rolled back%]  %[2/4, db%-primary 1/1%]$", lines[5])
    assert.matches("^h1          ✔ jobs%s+restart ok %(900 ms%)  %[3/4, h1 2/2%]$", lines[7])
    assert.matches("^local       %- web%s+skipped: api failed$", lines[8])
    -- every service line has its text at the same column
    for i = 2, 8 do assert.equal(" ", lines[i]:sub(11, 11), lines[i]) end
  end)

  it("draws the live line with the counts per host and the services in flight by host", function()
    local text = output({ live = true }, function(view)
      view:begin({ order = order, parallel = 2, hosts = hosts_of(svcs) })
      view:event({ event = "SERVICE_RESTART_SUCCESS", service = "db", method = "restart", duration_ms = 10 })
      view:step(svcs[2], "migrate")
      view:step(svcs[3], "restart")
      view:draw_live()
    end)
    local live = text:match("([^\r\n]*)$"):gsub("\27%[K", "")
    assert.matches("^%[1/4%] %d+s[^·]* · h1 1/2, db%-primary 0/1, local 0/1  ▸ ", live)
    -- by host, then name (the line is cut at the terminal's width)
    assert.matches("▸ db%-primary api: migr", live)
    assert.matches("h1          ✔ db%s+restart ok %(10 ms%)  %[1/4, h1 1/2%]\n", text) -- the finished line above it
  end)

  it("a platform on this machine alone: exactly the lines it always had", function()
    local here = { { name = "db" }, { name = "api" }, { name = "jobs" }, { name = "web" } }
    local text = output({}, function(view) play(view, here) end)
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal("plan: 4 service(s) in order: db, api, jobs, web", lines[1])
    assert.equal(("%-24s %s"):format("db", "restart"), lines[2])
    assert.equal(("✔ %-22s restart ok (1.2 s)  [1/4]"):format("db"), lines[3])
    assert.equal(("✘ %-22s failed: unhealthy [rolled back]  [2/4]"):format("api"), lines[5])
    assert.equal(("- %-22s skipped: api failed"):format("web"), lines[8])
    local live = output({ live = true }, function(view)
      view:begin({ order = order, parallel = 1, hosts = hosts_of(here) })
      view:step(here[1], "restart")
      view:draw_live()
    end)
    assert.matches("^%[0/4%] %d+s  ▸ db: restart %d+%.%ds$", (live:match("([^\r]*)$"):gsub("\27%[K", "")))
  end)
end)
