-- rr.journal on another host: the file there is rewritten whole (no append over ssh that a kill
-- cannot cut short), so records written at once by several services' flows must not race. A
-- real test host (spec/support/hosts.lua).
--
--   spec/support/run-specs ./rrengine spec/journal_remote_spec.lua
local rr = require("rr")
local fs = require("rr.fs")
local hostfs = require("rr.hostfs")
local journal = require("rr.journal")
local hosts = require("spec.support.hosts")

describe("rr.journal on a host", function()
  local hs, h, dir

  lazy_setup(function()
    hs = hosts.start(1)
    h = hostfs.remote(hs[1].name, { ssh_config = hs[1].ssh_config })
    dir = assert(fs.mkdtemp("/tmp/rr-journal-remote-"))
  end)

  lazy_teardown(function()
    if dir then fs.remove_tree(dir) end
    if hs then hosts.stop(hs) end
  end)

  it("keeps every record of services written at once, durable ones on disk before they return", function()
    local root = dir .. "/state"
    assert(fs.mkdir_p(root, 448))
    local names = {}
    for i = 1, 12 do names[i] = ("svc%02d"):format(i) end
    local j = assert(journal.create(root, { run = "r1", order = names, fs = h, host = hs[1].name }))
    local tasks = {}
    for i, n in ipairs(names) do
      tasks[i] = rr.spawn(function()
        j:update(n, { phase = "inspect" })
        j:update(n, { phase = "apply" }) -- durable
        -- what a durable record announces is in the file on the host once it returns
        local seen = assert(journal.read(root, h))
        assert(seen.services[n] and seen.services[n].phase == "apply", n .. " not on the host yet")
        if i % 3 == 0 then j:finished(n, true) end
      end)
    end
    for i, r in ipairs(rr.wait(tasks)) do assert(r[1], names[i] .. ": " .. tostring(r[2])) end
    j:update("svc01", { phase = "verify" })
    local data = assert(journal.read(root, h))
    local in_flight = journal.in_flight(data)
    assert.equal(8, #in_flight)
    assert.same({ "svc03", "svc06", "svc09", "svc12" }, (function()
      local d = { table.unpack(data.done) }
      table.sort(d)
      return d
    end)())
    assert.equal("verify", data.services.svc01.phase)
    for _, n in ipairs(in_flight) do
      if n ~= "svc01" then assert.equal("apply", data.services[n].phase, n) end
    end
    assert(j:close())
    assert.is_false(fs.exists(root .. "/run.journal"))
  end)
end)
