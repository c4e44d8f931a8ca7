-- Specs for rr.socket (engine/socket.c) against real peers on this machine: HAProxy's admin
-- socket (unix-domain), build/fixture over TCP, and a HAProxy frontend that is full (maxconn 1,
-- backlog 1: further connections wait in the kernel, never accepted; the one after those is
-- never even answered), for the connect and write timeouts.
--   spec/support/run-specs ./rrengine spec/socket_spec.lua
local rr = require("rr")
local socket = require("rr.socket")
local http = require("rr.http")
local fs = require("rr.fs")
local hx = require("spec.support.haproxy")
local units = require("spec.support.units")

-- The socket descriptors this process has open: fd number -> true.
local function socket_fds()
  local out = {}
  for _, name in ipairs(assert(fs.list("/proc/self/fd"))) do
    local target = fs.readlink("/proc/self/fd/" .. name)
    if target and target:match("^socket:") then out[tonumber(name)] = true end
  end
  return out
end

local function count(set)
  local n = 0
  for _ in pairs(set) do n = n + 1 end
  return n
end

describe("rr.socket", function()
  local ok_server, hang_server, big_server, h

  setup(function()
    ok_server = hx.fixture()
    hang_server = hx.fixture({ "--hang" })
    big_server = hx.fixture({ "--big-body", "100000" })
    h = hx.start({
      servers = { { name = "s1", port = ok_server.port } },
      ports = 1,
      extra = function(ports)
        return table.concat({
          "frontend full",
          "  bind 127.0.0.1:" .. ports[1] .. " backlog 1",
          "  maxconn 1",
          "  timeout client 60s",
          "  timeout http-request 60s",
          "  default_backend app",
        }, "\n")
      end,
    })
  end)

  teardown(function()
    if h then h:stop() end
    for _, s in ipairs({ ok_server, hang_server, big_server }) do
      if s then s:stop() end
    end
  end)

  describe("unix-domain", function()
    it("talks to a real peer: a command, a line, the rest until end of file", function()
      local c <close> = assert(socket.unix(h.socket))
      assert.equal("unix:" .. h.socket, c:peer())
      assert.equal("rr.socket.conn unix:" .. h.socket, tostring(c))
      assert.is_true(c:write("show info\n"))
      assert.equal("Name: HAProxy", c:read_line())
      local rest = assert(c:read_all())
      assert.matches("\nPid: %d+\n", "\n" .. rest)
      -- everything was read: the next line is the end of the stream
      local line, err, code = c:read_line()
      assert.is_nil(line)
      assert.equal("connection closed by unix:" .. h.socket, err)
      assert.equal("EOF", code)
      assert.equal("", c:read_all())
    end)

    it("reads a long answer that arrives in many pieces", function()
      local c <close> = assert(socket.unix(h.socket))
      assert(c:write("show stat\n"))
      local header = assert(c:read_line())
      assert.matches("^# pxname,svname,qcur,qmax,scur,", header)
      local rest = assert(c:read_all())
      assert.matches("\napp,s1,", "\n" .. rest, 1, true)
      assert.equal("\n\n", rest:sub(-2))
    end)

    it("says ENOENT, with the path, when no socket is there", function()
      local path = h.dir .. "/missing.sock"
      local c, err, code = socket.unix(path)
      assert.is_nil(c)
      assert.equal("cannot connect to unix:" .. path .. ": No such file or directory", err)
      assert.equal("ENOENT", code)
    end)

    it("says ECONNREFUSED for a file that is not a listening socket", function()
      local c, err, code = socket.unix(h.config)
      assert.is_nil(c)
      assert.matches("Connection refused", err)
      assert.equal("ECONNREFUSED", code)
    end)

    it("says ENAMETOOLONG for a path longer than a socket address holds", function()
      local c, err, code = socket.unix("/tmp/" .. string.rep("x", 200))
      assert.is_nil(c)
      assert.matches("longer than 107 bytes", err)
      assert.equal("ENAMETOOLONG", code)
    end)

    it("times out a read the peer does not answer, and the connection stays usable", function()
      local c <close> = assert(socket.unix(h.socket))
      local t0 = rr.now()
      local line, err, code = c:read_line({ timeout = 0.2 })
      assert.is_nil(line)
      assert.equal("timed out reading from unix:" .. h.socket, err)
      assert.equal("ETIMEDOUT", code)
      assert.is_true(rr.now() - t0 >= 0.2)
      assert.is_true(c:write("show info\n"))
      assert.equal("Name: HAProxy", c:read_line())
    end)
  end)

  describe("TCP", function()
    it("talks HTTP to the fixture: lines with CR LF, then the body until end of file", function()
      local c <close> = assert(socket.tcp("127.0.0.1", ok_server.port))
      assert.equal("127.0.0.1:" .. ok_server.port, c:peer())
      assert.is_true(c:write("GET /health HTTP/1.0\r\n\r\n"))
      assert.equal("HTTP/1.0 200 OK", c:read_line())
      local headers = {}
      while true do
        local line = assert(c:read_line())
        if line == "" then break end
        headers[#headers + 1] = line
      end
      assert.is_true(#headers > 0)
      assert.equal("ok", c:read_all())
      local _, _, code = c:read_line()
      assert.equal("EOF", code)
    end)

    it("returns a last line that has no newline, then EOF", function()
      local c <close> = assert(socket.tcp("localhost", ok_server.port))
      assert(c:write("GET /health HTTP/1.0\r\n\r\n"))
      repeat local line = assert(c:read_line()) until line == ""
      assert.equal("ok", c:read_line())
      assert.same({ nil, "connection closed by 127.0.0.1:" .. ok_server.port, "EOF" }, { c:read_line() })
    end)

    it("says ECONNREFUSED when nothing listens on the port", function()
      local port = units.free_port()
      local c, err, code = socket.tcp("127.0.0.1", port)
      assert.is_nil(c)
      assert.equal("cannot connect to 127.0.0.1:" .. port .. ": Connection refused", err)
      assert.equal("ECONNREFUSED", code)
    end)

    it("never resolves names (that would block the loop)", function()
      local c, err, code = socket.tcp("example.invalid", 80)
      assert.is_nil(c)
      assert.matches("not a numeric IP address", err)
      assert.equal("EINVAL", code)
    end)

    it("times out a connect that nobody answers", function()
      -- The full frontend accepts one connection; the kernel queues the next ones (backlog 1),
      -- then drops the SYNs of any further one: that connect never completes.
      local port = h.ports[1]
      local conns, got = {}, nil
      for _ = 1, 10 do
        local c, err, code = socket.tcp("127.0.0.1", port, { timeout = 0.3 })
        if not c then
          got = { err = err, code = code }
          break
        end
        conns[#conns + 1] = c
      end
      for _, c in ipairs(conns) do c:close() end
      assert.is_table(got, "every connect to the full frontend succeeded")
      assert.equal("cannot connect to 127.0.0.1:" .. port .. ": timed out after 0.3 s", got.err)
      assert.equal("ETIMEDOUT", got.code)
    end)

    it("times out a write the peer does not read, saying how much was left", function()
      -- Connections past the first one wait in the kernel's queue: their receive buffer fills
      -- and nothing ever reads it.
      local port = h.ports[1]
      local first <close> = assert(socket.tcp("127.0.0.1", port))
      local queued <close> = assert(socket.tcp("127.0.0.1", port))
      local ok, err, code = queued:write(string.rep("x", 32 * 1024 * 1024), { timeout = 0.3 })
      assert.is_nil(ok)
      assert.matches("^timed out writing to 127%.0%.0%.1:%d+ %(%d+ of 33554432 bytes left%)$", err)
      assert.equal("ETIMEDOUT", code)
    end)

    it("times out a read on an accepted connection that never answers", function()
      local c <close> = assert(socket.tcp("127.0.0.1", hang_server.port))
      assert(c:write("GET /health HTTP/1.0\r\n\r\n"))
      local t0 = rr.now()
      local body, err, code = c:read_all({ timeout = 0.2 })
      assert.is_nil(body)
      assert.equal("timed out reading from 127.0.0.1:" .. hang_server.port, err)
      assert.equal("ETIMEDOUT", code)
      assert.is_true(rr.now() - t0 >= 0.2)
    end)

    it("fails a read past its cap with EMSGSIZE", function()
      local c <close> = assert(socket.tcp("127.0.0.1", big_server.port))
      assert(c:write("GET /health HTTP/1.0\r\n\r\n"))
      local line, err, code = c:read_line({ max = 8 })
      assert.is_nil(line)
      assert.equal("a line from 127.0.0.1:" .. big_server.port .. " is longer than 8 bytes", err)
      assert.equal("EMSGSIZE", code)
      local all
      all, err, code = c:read_all({ max = 1000 })
      assert.is_nil(all)
      assert.equal("more than 1000 bytes from 127.0.0.1:" .. big_server.port, err)
      assert.equal("EMSGSIZE", code)
    end)

    it("reads a large answer whole within the cap", function()
      local c <close> = assert(socket.tcp("127.0.0.1", big_server.port))
      assert(c:write("GET /health HTTP/1.0\r\n\r\n"))
      local all = assert(c:read_all())
      local body = all:match("\r\n\r\n(.*)$")
      assert.equal(100000, #body)
    end)

    it("fails a write after its own shutdown with EPIPE (never SIGPIPE)", function()
      local c <close> = assert(socket.tcp("127.0.0.1", ok_server.port))
      assert.is_true(c:shutdown())
      local ok, err, code = c:write("GET / HTTP/1.0\r\n\r\n")
      assert.is_nil(ok)
      assert.equal("cannot write to 127.0.0.1:" .. ok_server.port .. ": Broken pipe", err)
      assert.equal("EPIPE", code)
    end)
  end)

  describe("on the loop", function()
    it("lets other tasks run while one waits on a socket", function()
      local order = {}
      local reader = rr.spawn(function()
        local c <close> = assert(socket.tcp("127.0.0.1", hang_server.port))
        assert(c:write("GET /health HTTP/1.0\r\n\r\n"))
        local _, _, code = c:read_line({ timeout = 1 })
        order[#order + 1] = "read " .. tostring(code)
      end)
      local getter = rr.spawn(function()
        assert(http.get("http://127.0.0.1:" .. ok_server.port .. "/health"))
        order[#order + 1] = "http"
      end)
      rr.wait({ reader, getter })
      assert.same({ "http", "read ETIMEDOUT" }, order)
    end)

    it("keeps the connection usable when a task waiting on it is canceled", function()
      local c <close> = assert(socket.unix(h.socket))
      local t = rr.spawn(function() return c:read_line({ timeout = 30 }) end)
      -- one turn of the scheduler: the task starts its wait
      rr.wait(rr.spawn(function() coroutine.yield() end))
      assert.equal("waiting", t:status())
      t:cancel()
      local ok, err = rr.wait(t)
      assert.is_false(ok)
      assert.matches("canceled", err)
      assert.is_true(c:write("show info\n"))
      assert.equal("Name: HAProxy", c:read_line())
    end)

    it("ends a wait with ECANCELED when another task closes the connection", function()
      local c = assert(socket.unix(h.socket))
      local t = rr.spawn(function() return c:read_line({ timeout = 30 }) end)
      rr.wait(rr.spawn(function() coroutine.yield() end))
      assert.equal("waiting", t:status())
      c:close()
      assert.same({ true, nil, "socket closed while waiting", "ECANCELED" }, { rr.wait(t) })
    end)

    it("refuses a second operation while one waits (misuse)", function()
      local c <close> = assert(socket.unix(h.socket))
      local t = rr.spawn(function() return c:read_line({ timeout = 30 }) end)
      rr.wait(rr.spawn(function() coroutine.yield() end))
      assert.has_error(function() c:read_line() end, "socket busy: another task is using it")
      t:cancel()
      rr.wait(t)
    end)
  end)

  describe("handles", function()
    it("are non-blocking and close-on-exec", function()
      local before = socket_fds()
      local c <close> = assert(socket.tcp("127.0.0.1", ok_server.port))
      local new = {}
      for fd in pairs(socket_fds()) do
        if not before[fd] then new[#new + 1] = fd end
      end
      assert.equal(1, #new)
      local info = assert(fs.read("/proc/self/fdinfo/" .. new[1]))
      local flags = tonumber(info:match("flags:%s*(%d+)"), 8)
      assert.is_true(flags & tonumber("2000000", 8) ~= 0, "O_CLOEXEC missing")
      assert.is_true(flags & tonumber("4000", 8) ~= 0, "O_NONBLOCK missing")
    end)

    it("are closed by close(), <close> and garbage collection", function()
      local before = count(socket_fds())
      do
        local a <close> = assert(socket.tcp("127.0.0.1", ok_server.port))
        local b = assert(socket.unix(h.socket))
        assert.equal(before + 2, count(socket_fds()))
        b:close()
        b:close() -- idempotent
        assert.equal("rr.socket.conn (closed)", tostring(b))
        assert.has_error(function() b:write("x") end, "attempt to use a closed socket")
      end
      assert.equal(before, count(socket_fds()))
      for _ = 1, 5 do assert(socket.tcp("127.0.0.1", ok_server.port)) end
      collectgarbage("collect")
      collectgarbage("collect")
      assert.equal(before, count(socket_fds()))
    end)

    it("raise on misuse", function()
      assert.has_error(function() socket.tcp("127.0.0.1", 0) end)
      assert.has_error(function() socket.tcp("127.0.0.1", 80, { timout = 1 }) end, "unknown option 'timout'")
      assert.has_error(function() socket.unix("") end)
      assert.has_error(function() socket.unix(h.socket, { timeout = -1 }) end)
      local c <close> = assert(socket.unix(h.socket))
      assert.has_error(function() c:read_all({ max = 0 }) end)
      assert.has_error(function() c:write(nil) end)
    end)
  end)
end)
