-- Specs for hosts: test hosts (spec/support/hosts.lua), the remote manager (rr.systemd.remote:
-- sd-bus over ssh to systemd-stdio-bridge) and rr.remote (commands, rsync, the per-host lock),
-- against real sshd servers and real user managers, one sandbox per host.
--
--   spec/support/run-specs ./rrengine spec/hosts_spec.lua
--
-- Needs the engine as the interpreter, root (sandboxes, sshd) and Debian's openssh-server.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local hosts = require("spec.support.hosts")

-- Run argv; its result table, or nil, message, result.
local function run(argv, opts)
  return proc.run(argv, opts or { timeout = 20 })
end

describe("hosts", function()
  local hs

  lazy_setup(function()
    hs = hosts.start(3)
  end)

  lazy_teardown(function()
    if hs then hosts.stop(hs) end
  end)

  describe("test hosts", function()
    it("run an sshd each, whose sessions reach that host's own manager and state", function()
      for _, h in ipairs({ hs[1], hs[2] }) do
        local res, err, r = run(hosts.ssh(h, "printf '%s\\n' \"$RR_TEST_HOST\" \"$XDG_STATE_HOME\";"
          .. " systemctl --user show --value -p Version"))
        assert(res, tostring(err) .. " " .. (type(r) == "table" and r.stderr or ""))
        local name, state, version = res.stdout:match("^([^\n]*)\n([^\n]*)\n([^\n]*)\n$")
        assert.equal(h.name, name)
        assert.equal(h.env.XDG_STATE_HOME, state)
        assert.matches("^%d+", version)
      end
    end)
  end)
end)
