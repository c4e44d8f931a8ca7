-- One ssh connection per host for a run: the run lock's connection is the ControlMaster of every
-- later ssh to that host (commands, rsync), even when the user's ssh config shares nothing, and
-- it goes with the lock. Real sshd test hosts (spec/support/hosts.lua).
--
--   spec/support/run-specs ./rrengine spec/remote_master_spec.lua
local fs = require("rr.fs")
local proc = require("rr.proc")
local remote = require("rr.remote")
local hosts = require("spec.support.hosts")

describe("rr.remote's shared connection", function()
  local hs, cfg

  lazy_setup(function()
    hs = hosts.start(1)
    -- the test hosts' config shares a connection itself: this one does not, as many users' do not
    local text = assert(fs.read(hs[1].ssh_config))
    local kept = {}
    for line in text:gmatch("[^\n]*") do
      if not line:match("^%s*Control") then kept[#kept + 1] = line end
    end
    cfg = hs.base .. "/ssh_config.plain"
    assert(fs.write_atomic(cfg, table.concat(kept, "\n")))
  end)

  lazy_teardown(function()
    if hs then hosts.stop(hs) end
  end)

  -- The client port of the TCP connection a command on h1 came in on (sshd's SSH_CONNECTION).
  local function client_port()
    local res = assert(remote.run("h1", { "sh", "-c", "echo $SSH_CONNECTION" }, { ssh_config = cfg, capture = true,
      timeout = 20 }))
    return assert(res.stdout:match("^%S+ (%d+) "), res.stdout)
  end

  it("carries every command while the lock is held, and none after", function()
    -- without a lock: a connection per command
    local a, b = client_port(), client_port()
    assert.are_not.equal(a, b)
    local lock = assert(remote.lock("h1", { ssh_config = cfg, user = true }))
    local control = lock:control_path()
    assert.is_truthy(control, "no shared connection")
    assert.is_truthy(fs.stat(control), "no socket at " .. control)
    local first = client_port()
    for _ = 1, 3 do assert.equal(first, client_port()) end
    -- rsync goes through it too: its -e names the socket
    local argv = remote.rsync_argv("h1", { "-a" }, "/tmp/x/", "/tmp/y/", { ssh_config = cfg })
    local e
    for i, w in ipairs(argv) do if w == "-e" then e = argv[i + 1] end end
    assert.matches("ControlPath=" .. control, e, 1, true)
    assert(lock:unlock())
    assert.is_nil(fs.stat(control))
    assert.are_not.equal(client_port(), client_port())
  end)

  it("runs many commands at once on it, within what sshd allows one connection (MaxSessions)", function()
    local lock = assert(remote.lock("h1", { ssh_config = cfg, user = true }))
    local first = client_port()
    local tasks = {}
    for i = 1, 24 do
      tasks[i] = require("rr").spawn(function()
        local res, err = remote.run("h1", { "sh", "-c", "sleep 0.3; echo $SSH_CONNECTION" }, { ssh_config = cfg,
          capture = true, timeout = 30 })
        assert(res, err)
        return res.stdout:match("^%S+ (%d+) ")
      end)
    end
    for i, r in ipairs(require("rr").wait(tasks)) do
      assert(r[1], "command " .. i .. ": " .. tostring(r[2]))
      assert.equal(first, r[2], "command " .. i .. " came on another connection")
    end
    assert(lock:unlock())
  end)

  it("keeps its socket path short when $XDG_RUNTIME_DIR is long (a unix socket path has 107 bytes)", function()
    local long = hs.base .. "/" .. ("r"):rep(90)
    assert(fs.mkdir_p(long, "0700"))
    local script = hs.base .. "/short.lua"
    assert(fs.write_atomic(script, ([[
      local remote = require("rr.remote")
      local lock = assert(remote.lock("h1", { ssh_config = %q, user = true }))
      print(lock:control_path())
      assert(lock:unlock())
    ]]):format(cfg)))
    local engine = os.getenv("RR_ENGINE") or arg[-1]
    local env = {}
    for _, k in ipairs({ "PATH", "HOME", "USER" }) do env[k] = os.getenv(k) end
    env.XDG_RUNTIME_DIR = long
    local res = assert(proc.run({ engine, script }, { env = env, capture = true, timeout = 30 }))
    local path = res.stdout:match("^(%S+)")
    assert.is_truthy(path, res.stdout .. res.stderr)
    assert.matches("^/tmp/rrengine%-ssh%.", path)
  end)

  it("goes with the engine: a killed engine leaves no session on the host", function()
    local script = hs.base .. "/hold.lua"
    assert(fs.write_atomic(script, ([[
      local remote = require("rr.remote")
      local lock = assert(remote.lock("h1", { ssh_config = %q, user = true }))
      io.stdout:write("locked ", lock:control_path(), "\n")
      io.stdout:flush()
      require("rr").sleep(60)
    ]]):format(cfg)))
    local engine = os.getenv("RR_ENGINE") or arg[-1]
    local control
    local said = {}
    local p = assert(proc.spawn({ engine, script }, {
      on_line = function(_, line)
        control = control or line:match("^locked (%S+)")
        said[#said + 1] = line
      end,
    }))
    local deadline = require("rr").now() + 20
    while not control and p:running() and require("rr").now() < deadline do require("rr").sleep(0.02) end
    assert.is_truthy(control, "the engine never took the lock: " .. table.concat(said, "\n"))
    assert(p:kill("KILL"))
    p:wait()
    -- its master died with it: the lock is free again at once
    local lock = assert(remote.lock("h1", { ssh_config = cfg, user = true, wait = 5 }))
    assert(lock:unlock())
  end)
end)
