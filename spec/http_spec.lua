-- Specs for rr.http (engine/http.c) against real HTTP servers on 127.0.0.1: build/fixture,
-- started with rr.proc. Run with the engine as the interpreter:
--   ./rrengine /usr/bin/busted spec/http_spec.lua
local loop = require("rr.loop")
local http = require("rr.http")

-- `make` builds the fixture as build/fixture; $RR_FIXTURE_BIN overrides it (as in spec/support/units.lua).
local FIXTURE = os.getenv("RR_FIXTURE_BIN") or ((os.getenv("RRENGINE_ROOT") or ".") .. "/build/fixture")

-- ---- a fixture server per behaviour -------------------------------------------------------

-- Starts build/fixture with extra arguments on a free port (--port 0, read back from
-- --port-file) and waits until its port answers. Returns { url = "http://127.0.0.1:N",
-- port = N, stop = fn }.
local function start_fixture(...)
  local proc = require("rr.proc")
  assert(proc.spawn, "rr.proc.spawn is needed to start the fixture")
  local f = io.open(FIXTURE)
  assert(f, FIXTURE .. " is missing: run `make build/fixture` (or set RR_FIXTURE_BIN)")
  f:close()

  local port_file = os.tmpname()
  os.remove(port_file) -- the fixture writes it once it listens
  local argv = { FIXTURE, "--port", "0", "--port-file", port_file, ... }
  local p = assert(proc.spawn(argv))
  local server = { proc = p }
  function server.stop()
    if server.proc then
      server.proc:kill()
      server.proc:wait()
      server.proc = nil
    end
  end

  local deadline = loop.now() + 5
  while not server.port and loop.now() < deadline do
    local pf = io.open(port_file)
    if pf then
      server.port = tonumber(pf:read("l"))
      pf:close()
    end
    if not server.port then loop.sleep(0.01) end
  end
  os.remove(port_file)
  if not server.port then
    server.stop()
    error("fixture did not start: " .. table.concat(argv, " "))
  end
  server.url = "http://127.0.0.1:" .. server.port

  -- Listening: wait until a connection is no longer refused (a --hang server never answers,
  -- so a short timeout counts as up).
  while true do
    local _, _, code = http.get(server.url .. "/health", { timeout = 0.2 })
    if code ~= "refused" then break end
    if loop.now() > deadline then
      server.stop()
      error("fixture never accepted connections on port " .. server.port)
    end
    loop.sleep(0.01)
  end
  return server
end

local function is_lower(s)
  return s == s:lower()
end

describe("rr.http", function()
  local ok_server, error_server, hang_server, big_server

  setup(function()
    ok_server = start_fixture()
    error_server = start_fixture("--status", "500")
    hang_server = start_fixture("--hang")
    big_server = start_fixture("--big-body", "1000000")
  end)

  teardown(function()
    for _, s in ipairs({ ok_server, error_server, hang_server, big_server }) do
      if s then s.stop() end
    end
  end)

  describe("get", function()
    it("returns status, lower-case headers, body, duration and the effective url", function()
      local url = ok_server.url .. "/health"
      local res, err = http.get(url)
      assert.is_nil(err)
      assert.equal(200, res.status)
      assert.equal("ok", res.body)
      assert.is_false(res.truncated)
      assert.equal(url, res.url)
      assert.is_number(res.duration)
      assert.is_true(res.duration >= 0 and res.duration < 5)
      assert.equal("text/plain", res.headers["content-type"])
      assert.equal("2", res.headers["content-length"])
      assert.is_nil(res.headers["Content-Type"])
      for name in pairs(res.headers) do
        assert.is_true(is_lower(name), "header name not lower-case: " .. name)
      end
      assert.is_nil(res.body_matches) -- only with expect_body
    end)

    it("returns any HTTP status as a response, 500 included", function()
      local res, err = http.get(error_server.url .. "/health")
      assert.is_nil(err)
      assert.equal(500, res.status)
      assert.equal("error", res.body)

      res = assert(http.get(ok_server.url .. "/nowhere"))
      assert.equal(404, res.status)
    end)

    it("matches expect_body as a plain substring", function()
      local res = assert(http.get(ok_server.url .. "/health", { expect_body = "ok" }))
      assert.is_true(res.body_matches)
      res = assert(http.get(ok_server.url .. "/health", { expect_body = "healthy" }))
      assert.is_false(res.body_matches)
      res = assert(http.get(error_server.url .. "/health", { expect_body = "." })) -- plain, not a pattern
      assert.is_false(res.body_matches)
    end)

    it("reports a refused connection as 'refused'", function()
      local gone = start_fixture()
      local url = gone.url .. "/health"
      gone.stop() -- nothing listens on its port now
      local res, err, code = http.get(url)
      assert.is_nil(res)
      assert.equal("connection refused", err)
      assert.equal("refused", code)
    end)

    it("times out at the request timeout on a server that never answers", function()
      local t0 = loop.now()
      local res, err, code = http.get(hang_server.url .. "/health", { timeout = 1 })
      local elapsed = loop.now() - t0
      assert.is_nil(res)
      assert.equal("timed out after 1.0 s", err)
      assert.equal("timeout", code) -- the connection was accepted: not "connect_timeout"
      assert.is_true(elapsed >= 1, "returned early: " .. elapsed)
      assert.is_true(elapsed < 2, "returned late: " .. elapsed)
    end)

    it("tells a connection that never completed ('connect_timeout') from one that did", function()
      -- https to a server that never answers: TCP is accepted, the TLS handshake never ends,
      -- and curl counts the handshake as part of connecting.
      local t0 = loop.now()
      -- (The message gives the measured time: setting TLS up may add to it on a slow machine.)
      local res, err, code = http.get("https://127.0.0.1:" .. hang_server.port .. "/health",
        { timeout = 5, connect_timeout = 0.5 })
      local elapsed = loop.now() - t0
      assert.is_nil(res)
      assert.equal("connect_timeout", code)
      assert.matches("^connect timed out after %d+%.%d s$", err)
      -- the code, not the clock, tells it from the 5 s total (setting TLS up can take seconds
      -- under valgrind)
      assert.is_true(elapsed >= 0.5, "elapsed " .. elapsed)
    end)

    it("keeps max_body bytes of an oversized body and marks it truncated", function()
      local res = assert(http.get(big_server.url .. "/health"))
      assert.equal(200, res.status)
      assert.equal(64 * 1024, #res.body) -- the default cap
      assert.is_true(res.truncated)

      res = assert(http.get(big_server.url .. "/health", { max_body = 1000 }))
      assert.equal(200, res.status)
      assert.equal(string.rep("x", 1000), res.body)
      assert.is_true(res.truncated)
    end)

    it("does not mark a body that fits exactly as truncated", function()
      local res = assert(http.get(ok_server.url .. "/health", { max_body = 2 }))
      assert.equal("ok", res.body)
      assert.is_false(res.truncated)
      res = assert(http.get(ok_server.url .. "/health", { max_body = 1 }))
      assert.equal("o", res.body)
      assert.is_true(res.truncated)
    end)

    it("refuses every scheme but http and https before any transfer", function()
      local res, err, code = http.get("file:///etc/passwd")
      assert.is_nil(res)
      assert.equal("only http and https URLs are allowed: file:///etc/passwd", err)
      assert.equal("protocol", code)
      for _, url in ipairs({ "ftp://127.0.0.1/", "gopher://127.0.0.1/", "dict://127.0.0.1/", "FILE:///etc/hostname" }) do
        res, err, code = http.get(url)
        assert.is_nil(res)
        assert.equal("only http and https URLs are allowed: " .. url, err)
        assert.equal("protocol", code)
      end
    end)

    it("reports a URL that does not parse as 'url'", function()
      local res, err, code = http.get("not a url")
      assert.is_nil(res)
      assert.equal("invalid URL: not a url", err)
      assert.equal("url", code)
    end)

    it("reports an unknown host as 'resolve'", function()
      local res, err, code = http.get("http://no-such-host.invalid/health", { timeout = 5 })
      assert.is_nil(res)
      assert.equal("resolve", code)
      assert.equal("could not resolve host no-such-host.invalid", err)
    end)

    it("sends request headers", function()
      -- The fixture ignores them; a bad one would be refused by curl or the server.
      local res = assert(http.get(ok_server.url .. "/health", { headers = { ["X-Probe"] = "rrengine", Accept = "text/plain" } }))
      assert.equal(200, res.status)
    end)

    it("raises on misuse", function()
      assert.has_error(function() http.get(42) end)
      assert.has_error(function() http.get() end)
      assert.has_error(function() http.get(ok_server.url, "fast") end)
      assert.has_error(function() http.get(ok_server.url, { timout = 1 }) end, "unknown option 'timout'")
      assert.has_error(function() http.get(ok_server.url, { timeout = 0 }) end)
      assert.has_error(function() http.get(ok_server.url, { timeout = "1" .. "x" }) end)
      assert.has_error(function() http.get(ok_server.url, { max_body = -1 }) end)
      assert.has_error(function() http.get(ok_server.url, { follow_redirects = "yes" }) end)
      assert.has_error(function() http.get(ok_server.url, { headers = { ["Bad Name"] = "x" } }) end)
      assert.has_error(function() http.get(ok_server.url, { headers = { X = "a\r\nInjected: 1" } }) end)
      assert.has_error(function() http.get(ok_server.url, { headers = { X = 1 } }) end)
      assert.has_error(function() http.get(ok_server.url, { method = "POST" }) end) -- http.request's
    end)
  end)

  describe("request", function()
    it("sends the method and the body", function()
      -- The fixture answers 405 to anything but GET and HEAD: the POST reached it as a POST.
      local res = assert(http.request({ method = "POST", url = ok_server.url .. "/health",
        body = '{"text":"restarted"}', headers = { ["Content-Type"] = "application/json" } }))
      assert.equal(405, res.status)
      res = assert(http.request({ method = "DELETE", url = ok_server.url .. "/health" }))
      assert.equal(405, res.status)
    end)

    it("does GET by default and HEAD without a body", function()
      local res = assert(http.request({ url = ok_server.url .. "/health" }))
      assert.equal(200, res.status)
      assert.equal("ok", res.body)
      res = assert(http.request({ method = "HEAD", url = ok_server.url .. "/health" }))
      assert.equal(200, res.status)
      assert.equal("", res.body)
      assert.equal("2", res.headers["content-length"])
    end)

    it("raises on misuse", function()
      assert.has_error(function() http.request("http://127.0.0.1/") end)
      assert.has_error(function() http.request({}) end)
      assert.has_error(function() http.request({ url = ok_server.url, method = "get" }) end)
      assert.has_error(function() http.request({ url = ok_server.url, method = "HEAD", body = "x" }) end)
    end)
  end)

  describe("on the loop", function()
    it("runs 200 requests from 200 tasks at once", function()
      local url = ok_server.url .. "/slow?ms=500"
      local t0 = loop.now()
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = loop.spawn(function() return http.get(url, { timeout = 10 }) end)
      end
      local statuses = {}
      for i, outcome in ipairs(loop.wait(tasks)) do
        local ok, res, err = outcome[1], outcome[2], outcome[3]
        assert.is_true(ok, tostring(res))
        assert.is_table(res, "request " .. i .. ": " .. tostring(err))
        statuses[res.status] = (statuses[res.status] or 0) + 1
      end
      local elapsed = loop.now() - t0
      assert.same({ [200] = 200 }, statuses)
      -- One after the other they would take 100 s; together, about 0.5 s (a few under valgrind):
      -- a bound that tells concurrent from serial, not a speed.
      assert.is_true(elapsed < 20, "200 concurrent requests took " .. elapsed .. " s")
      assert.equal(0, http.stats().requests)
    end)

    it("frees the transfer of a canceled task while the others complete", function()
      local hung = loop.spawn(function() return http.get(hang_server.url .. "/health", { timeout = 10 }) end)
      local others = {}
      for i = 1, 10 do
        others[i] = loop.spawn(function() return http.get(ok_server.url .. "/slow?ms=300") end)
      end
      local dropped = loop.spawn(function() return http.get(ok_server.url .. "/slow?ms=300") end)
      loop.sleep(0.1)
      assert.equal(12, http.stats().requests)

      local t0 = loop.now()
      hung:cancel()
      dropped:cancel()
      assert.equal(10, http.stats().requests) -- removed at once, not at its timeout
      local ok, err = loop.wait(hung)
      assert.is_false(ok)
      assert.matches("canceled", tostring(err))
      assert.is_false((loop.wait(dropped)))

      for _, outcome in ipairs(loop.wait(others)) do
        assert.is_true(outcome[1])
        assert.equal(200, outcome[2].status)
      end
      assert.is_true(loop.now() - t0 < 2)
      assert.equal(0, http.stats().requests)
      assert.equal(0, http.stats().sockets)

      -- And the client still works.
      assert.equal(200, assert(http.get(ok_server.url .. "/health")).status)
    end)

    it("blocks the caller when called outside a task, and yields inside one", function()
      assert.is_nil(loop.current())
      local res = assert(http.get(ok_server.url .. "/slow?ms=100"))
      assert.equal(200, res.status)

      local ticks = 0
      local ticker = loop.spawn(function()
        for _ = 1, 5 do
          loop.sleep(0.01)
          ticks = ticks + 1
        end
      end)
      local probe = loop.spawn(function() return http.get(ok_server.url .. "/slow?ms=200") end)
      local ok, r = loop.wait(probe)
      assert.is_true(ok)
      assert.equal(200, r.status)
      assert.equal(5, ticks) -- the ticker ran while the probe waited
      loop.wait(ticker)
    end)
  end)
end)
