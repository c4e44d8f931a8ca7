-- Specs for rr.services: loading a services file and validating a platform.
local services = require("rr.services")

describe("rr.services", function()
  local created = {}

  -- Writes a fixture services file into a fresh temporary file; removed after
  -- each test.
  local function fixture(source)
    local path = os.tmpname()
    local file = assert(io.open(path, "wb"))
    file:write(source)
    file:close()
    created[#created + 1] = path
    return path
  end

  after_each(function()
    for _, path in ipairs(created) do os.remove(path) end
    created = {}
  end)

  -- Validates a table and returns the problems (asserting there are some).
  local function problems_of(tbl)
    local platform, problems = services.validate(tbl, "services.lua")
    assert.is_nil(platform)
    return problems
  end

  -- One service table with the required fields plus `extra`.
  local function one(extra)
    local entry = { name = "sso.api", unit = "lilith-sso-api.service" }
    for k, v in pairs(extra or {}) do entry[k] = v end
    return { services = { entry } }
  end

  describe("load", function()
    it("loads and normalizes a valid file", function()
      local path = fixture([[
        return {
          defaults = { health = { timeout = 60, retries = 5 }, stabilize = 10 },
          services = {
            { name = "db", unit = "db.service", health = "systemd" },
            { name = "api", unit = "api.service", kind = "api", depends = { "db" },
              health = { url = "http://localhost:3001/health", interval = 2, expect_body = '"ok"' },
              working_dir = "/srv/api", migrate = { "npx", "prisma", "migrate", "deploy" },
              reload = true, hooks = "hooks/api.lua", stabilize = 0 },
            { name = "cron", unit = "cron.timer", health = "none", deploy_delete = true,
              start_timeout = 5, stop_timeout = 2.5 },
          },
        }
      ]])
      local platform, problems = services.load(path)
      assert.is_nil(problems)
      assert.equal(path, platform.source)
      assert.equal(3, #platform.services)
      assert.equal(platform.services[2], platform.by_name.api)
      local dir = path:match("^(.*)/[^/]*$")
      assert.same({
        index = 2, name = "api", unit = "api.service", kind = "api", depends = { "db" },
        health = { kind = "http", url = "http://localhost:3001/health", timeout = 60, retries = 5,
                   interval = 2, expect_body = '"ok"' },
        stabilize = 0, working_dir = "/srv/api", migrate = { "npx", "prisma", "migrate", "deploy" },
        reload = true, deploy_delete = false, hooks = dir .. "/hooks/api.lua",
      }, platform.services[2])
      assert.same({
        index = 1, name = "db", unit = "db.service", depends = {},
        health = { kind = "systemd", timeout = 60, retries = 5, interval = 1 },
        stabilize = 10, reload = false, deploy_delete = false,
      }, platform.services[1])
      assert.same({ kind = "none", timeout = 60, retries = 5, interval = 1 }, platform.services[3].health)
      assert.equal(true, platform.services[3].deploy_delete)
      assert.equal(5, platform.services[3].start_timeout)
      assert.equal(2.5, platform.services[3].stop_timeout)
    end)

    it("validates the example services.lua at the repository root", function()
      local platform, problems = services.load("services.lua")
      assert.is_nil(problems)
      local by_name = platform.by_name
      assert.equal("systemd", by_name["sso.postgresql"].health.kind)
      assert.equal("systemd", by_name["minio"].health.kind)
      assert.same({ "sso.postgresql", "sso.redis" }, by_name["sso.api"].depends)
      assert.same({ "npx", "prisma", "migrate", "deploy" }, by_name["sso.api"].migrate)
      assert.equal("hooks/sso.lua", by_name["sso.api"].hooks)
      assert.equal(true, by_name["sso.api"].reload)
      assert.equal("http", by_name["sso.api"].health.kind)
      local group = platform.groups["search.api"]
      assert.same({ "search.api.1", "search.api.2", "search.api.3" }, group.members)
      assert.equal(1, group.max_unavailable_count)
      assert.same({ haproxy = "/run/haproxy/admin.sock", backend = "search_api" }, group.balancer)
      assert.equal("search.api.2", by_name["search.api.2"].balancer_server)
    end)

    it("reports a missing file in one line", function()
      local path = os.tmpname()
      os.remove(path)
      assert.same({ nil, { path .. ": cannot read the services file: No such file or directory" } },
        { services.load(path) })
    end)

    it("reports a syntax error in one line with the line number, no traceback", function()
      local path = fixture("return {\n  services = {\n    { name = 'a' unit = 'a.service' },\n  },\n}\n")
      assert.same({ nil, { path .. ":3: '}' expected near 'unit'" } },
        { services.load(path) })
    end)

    it("reports a runtime error in one line", function()
      local path = fixture("local port = nil\nreturn { services = { { name = 'a', unit = 'a.service', port = port + 1 } } }\n")
      assert.same({ nil, { path .. ":2: attempt to perform arithmetic on a nil value (local 'port')" } },
        { services.load(path) })
    end)

    it("flattens a multi-line error message and one without a position", function()
      local path = fixture("error('first\\nsecond', 0)\n")
      assert.same({ nil, { path .. ": first second" } }, { services.load(path) })
      path = fixture("error({ code = 1 })\n")
      assert.same({ nil, { path .. ": raised an error that is not a message (a table)" } }, { services.load(path) })
    end)

    it("loads in a sandbox: no os, io, require or randomness", function()
      for _, expr in ipairs({ "os.getenv('HOME')", "io.open('/etc/passwd')", "require('rr.dag')",
                              "math.random()", "load('return 1')", "print('x')" }) do
        local path = fixture("return { services = {}, x = " .. expr .. " }\n")
        local platform, problems = services.load(path)
        assert.is_nil(platform)
        assert.equal(1, #problems)
        assert.matches("^" .. path:gsub("%p", "%%%0") .. ":1: attempt to ", problems[1])
      end
    end)

    it("lets a file build its services with loops and string functions", function()
      local path = fixture([[
        local list = {}
        for i = 1, 3 do
          list[#list + 1] = { name = ("worker.%d"):format(i), unit = ("worker@%d.service"):format(i),
                              depends = i > 1 and { "worker." .. (i - 1) } or nil }
        end
        table.insert(list, { name = "api", unit = string.upper("api") .. ".service" })
        return { services = list }
      ]])
      local platform = assert(services.load(path))
      assert.equal("worker@3.service", platform.by_name["worker.3"].unit)
      assert.equal("API.service", platform.by_name.api.unit)
    end)

    it("stops a file that loops forever", function()
      local path = fixture("local n = 0\nwhile true do n = n + 1 end\n")
      assert.same({ nil, { path .. ":2: runs more than 10000000 instructions (an endless loop?)" } },
        { services.load(path) })
    end)

    it("reports a file that does not return a table", function()
      local path = fixture("return 42\n")
      assert.same({ nil, { path .. ": must return a table { services = { ... } }, got number 42" } },
        { services.load(path) })
    end)

    it("rejects precompiled chunks", function()
      local path = fixture(string.dump(function() return { services = {} } end))
      local platform, problems = services.load(path)
      assert.is_nil(platform)
      assert.equal(path .. ": attempt to load a binary chunk (mode is 't')", problems[1])
    end)

    it("reports every problem of a file at once, in a fixed order", function()
      local path = fixture([[
        return {
          defaults = { health = { timeout = 0 } },
          services = {
            { name = "a", unit = "a.service", helth = "systemd" },
            { name = "b", unit = "b.servic", depends = { "zz" } },
            { name = "a", unit = "c.service", working_dir = "srv/c" },
          },
        }
      ]])
      local platform, problems = services.load(path)
      assert.is_nil(platform)
      assert.same({
        path .. ': defaults: field "health.timeout" must be a number of seconds from 1 to 86400 (24 h), got 0',
        path .. ': service "a": field "helth" is unknown (did you mean "health"?)',
        path .. ': service "b": field "unit" is not a valid systemd unit name: "b.servic" must end in '
          .. '.service, .socket, .target, .timer, .mount, .path',
        path .. ': service "b": field "depends" names unknown service "zz"',
        path .. ': service "a" (services[3]): field "name" duplicates services[1]',
        path .. ': service "a" (services[3]): field "working_dir" must be an absolute path, got "srv/c"',
      }, problems)
      -- Deterministic: the same file gives the same list.
      assert.same(problems, select(2, services.load(path)))
    end)
  end)

  describe("validate", function()
    it("names the source, the service and the field of an unknown field", function()
      assert.same({ 'services.lua: service "sso.api": field "helth" is unknown (did you mean "health"?)' },
        problems_of(one({ helth = "systemd" })))
      assert.same({ 'services.lua: service "sso.api": field "colour" is unknown' },
        problems_of(one({ colour = "red" })))
      assert.same({ 'services.lua: service "sso.api": field [1] is unknown' }, problems_of(one({ [1] = "x" })))
    end)

    it("rejects unknown top-level and defaults fields", function()
      assert.same({
        'services.lua: field "servics" is unknown (did you mean "services"?)',
        'services.lua: field "services" is required (a list of { name = ..., unit = ... })',
      }, problems_of({ servics = {} }))
      assert.same({
        'services.lua: defaults: field "stabilise" is unknown (did you mean "stabilize"?)',
        'services.lua: defaults: field "health.retires" is unknown (did you mean "health.retries"?)',
      }, problems_of({ defaults = { stabilise = 3, health = { retires = 2 } }, services = {} }))
      assert.same({ 'services.lua: defaults: field "health.url" is unknown' },
        problems_of({ defaults = { health = { url = "http://x/" } }, services = {} }))
    end)

    it("names expected and actual types", function()
      assert.same({
        'services.lua: service "sso.api": field "kind" must be a string, got number 3',
        'services.lua: service "sso.api": field "reload" must be a boolean, got string "yes"',
        'services.lua: service "sso.api": field "hooks" must be a string, got boolean true',
      }, problems_of(one({ kind = 3, reload = "yes", hooks = true })))
      assert.same({
        'services.lua: services[1]: field "name" must be a string, got table',
        'services.lua: services[1]: field "unit" must be a string, got table',
      }, problems_of({ services = { { name = {}, unit = {} } } }))
      assert.same({ 'services.lua: services[2] must be a table { name = ..., unit = ... }, got string "db"' },
        problems_of({ services = { { name = "a", unit = "a.service" }, "db" } }))
      assert.same({ 'services.lua: field "services" must be an array of services, got a table with key "a"' },
        problems_of({ services = { a = { name = "a", unit = "a.service" } } }))
      assert.same({ 'services.lua: field "defaults" must be a table, got number 1' },
        problems_of({ defaults = 1, services = {} }))
    end)

    it("requires name and unit", function()
      assert.same({
        'services.lua: services[1]: field "name" is required',
        'services.lua: services[1]: field "unit" is required',
      }, problems_of({ services = { {} } }))
    end)

    it("rejects names that do not fit a command line", function()
      assert.same({ 'services.lua: service "a,b": field "name" must be letters, digits and . _ : @ - '
        .. '(starting with a letter or digit), got "a,b"' },
        problems_of({ services = { { name = "a,b", unit = "a.service" } } }))
    end)

    it("rejects duplicate names and duplicate units", function()
      assert.same({
        'services.lua: service "a" (services[2]): field "name" duplicates services[1]',
        'services.lua: service "b": field "unit" "a.service" is also the unit of service "a"',
      }, problems_of({ services = {
        { name = "a", unit = "a.service" },
        { name = "a", unit = "a2.service" },
        { name = "b", unit = "a.service" },
      } }))
    end)

    describe("unit names", function()
      local function unit_problem(unit)
        local platform, problems = services.validate(one({ unit = unit }), "services.lua")
        if platform then return nil end
        return problems[1]
      end
      local prefix = 'services.lua: service "sso.api": field "unit" is not a valid systemd unit name: '

      it("accepts the supported suffixes and instance units", function()
        for _, unit in ipairs({ "a.service", "a.socket", "a.target", "a.timer", "a.mount", "a.path",
                                "foo@bar.service", "foo@bar.baz.service", "x:y_z-1\\x2d.service",
                                ("a"):rep(247) .. ".service" }) do
          assert.is_nil(unit_problem(unit), unit)
        end
      end)

      it("rejects invalid names with the reason", function()
        assert.equal(prefix .. '"a.device" must end in .service, .socket, .target, .timer, .mount, .path',
          unit_problem("a.device"))
        assert.equal(prefix .. '"sso-api" must end in .service, .socket, .target, .timer, .mount, .path',
          unit_problem("sso-api"))
        assert.equal(prefix .. '".service" has nothing before the suffix', unit_problem(".service"))
        assert.equal(prefix .. '"a b.service" may only contain letters, digits and : _ . \\ - (and one "@")',
          unit_problem("a b.service"))
        assert.equal(prefix .. '"a/b.service" may only contain letters, digits and : _ . \\ - (and one "@")',
          unit_problem("a/b.service"))
        assert.equal(prefix .. '"a@b@c.service" has more than one "@"', unit_problem("a@b@c.service"))
        assert.equal(prefix .. '"@b.service" has nothing before "@"', unit_problem("@b.service"))
        assert.equal(prefix .. '"foo@.service" is a template (nothing between "@" and the suffix)',
          unit_problem("foo@.service"))
        local long = ("a"):rep(248) .. ".service"
        assert.equal(prefix .. '"' .. long .. '" is longer than 255 characters', unit_problem(long))
      end)
    end)

    describe("health", function()
      it("defaults to systemd with the built-in timings", function()
        local platform = assert(services.validate(one(), "services.lua"))
        assert.same({ kind = "systemd", timeout = 30, retries = 3, interval = 1 }, platform.services[1].health)
        assert.equal(30, platform.services[1].stabilize)
      end)

      it("merges defaults deeply and lets a service override each field", function()
        local platform = assert(services.validate({
          defaults = { health = { timeout = 90, retries = 1 }, stabilize = 5, stop_timeout = 20 },
          services = {
            { name = "a", unit = "a.service", health = { url = "https://a.internal:8443/health", retries = 0 } },
            { name = "b", unit = "b.service", stabilize = 1, stop_timeout = 3 },
          },
        }, "services.lua"))
        assert.same({ kind = "http", url = "https://a.internal:8443/health", timeout = 90, retries = 0, interval = 1 },
          platform.services[1].health)
        assert.equal(5, platform.services[1].stabilize)
        assert.equal(20, platform.services[1].stop_timeout)
        assert.equal(1, platform.services[2].stabilize)
        assert.equal(3, platform.services[2].stop_timeout)
        assert.same({ timeout = 90, retries = 1, interval = 1 }, platform.defaults.health)
      end)

      it("normalizes an integral float count to an integer", function()
        local platform = assert(services.validate(one({ health = { url = "http://h/", retries = 2.0 } })))
        assert.equal("integer", math.type(platform.services[1].health.retries))
      end)

      it("rejects unknown kinds, unknown fields and a table without url", function()
        assert.same({ 'services.lua: service "sso.api": field "health" must be "systemd", "none" or a table '
          .. '{ url = ... }, got "sytemd" (did you mean "systemd"?)' }, problems_of(one({ health = "sytemd" })))
        assert.same({ 'services.lua: service "sso.api": field "health" must be "systemd", "none" or a table '
          .. '{ url = ... }, got boolean true' }, problems_of(one({ health = true })))
        assert.same({
          'services.lua: service "sso.api": field "health.method" is unknown',
          'services.lua: service "sso.api": field "health.url" is required when "health" is a table '
            .. '(use health = "systemd" for a unit-state check)',
        }, problems_of(one({ health = { method = "POST" } })))
      end)

      it("accepts only http and https URLs with a host", function()
        local function url_problem(url)
          local platform, problems = services.validate(one({ health = { url = url } }), "services.lua")
          return platform and "ok" or problems[1]:match('field "health.url" (.-): "')
        end
        assert.equal("ok", url_problem("http://localhost:3001/health"))
        assert.equal("ok", url_problem("HTTPS://api.example.com/ready?deep=1"))
        assert.equal("ok", url_problem("http://[::1]:8080/"))
        assert.equal("ok", url_problem("http://user:pw@host/"))
        assert.equal("is not an http:// or https:// URL", url_problem("ftp://host/"))
        assert.equal("is not an http:// or https:// URL", url_problem("file:///etc/passwd"))
        assert.equal("is not an http:// or https:// URL", url_problem("localhost:3001/health"))
        assert.equal("has no host", url_problem("http:///health"))
        assert.equal("has no host", url_problem("http://:80/"))
        assert.equal("has an invalid port", url_problem("http://host:0/"))
        assert.equal("has an invalid port", url_problem("http://host:99999/"))
        assert.equal("has an invalid port", url_problem("http://host:x/"))
        assert.equal("contains whitespace or control characters", url_problem("http://host/a b"))
        assert.same({ 'services.lua: service "sso.api": field "health.url" is not an http:// or https:// URL: '
          .. '"ftp://x" (expected http://HOST[:PORT]/PATH or https://...)' },
          problems_of(one({ health = { url = "ftp://x" } })))
      end)

      it("checks the ranges of timeout, retries and interval", function()
        assert.same({
          'services.lua: service "sso.api": field "health.timeout" must be a number of seconds from 1 to 86400 (24 h), got 0',
          'services.lua: service "sso.api": field "health.retries" must be an integer from 0 to 10000, got 1.5',
          'services.lua: service "sso.api": field "health.interval" must be a number of seconds from 0.01 to 86400 (24 h), got -1',
          'services.lua: service "sso.api": field "health.expect_body" must be a string, got number 200',
        }, problems_of(one({ health = { url = "http://h/", timeout = 0, retries = 1.5, interval = -1,
                                         expect_body = 200 } })))
        assert.same({ 'services.lua: service "sso.api": field "health.timeout" must be a number of seconds from 1 to 86400 (24 h), got inf' },
          problems_of(one({ health = { url = "http://h/", timeout = math.huge } })))
        assert.same({ 'services.lua: service "sso.api": field "health.retries" must be an integer from 0 to 10000, got -1' },
          problems_of(one({ health = { url = "http://h/", retries = -1 } })))
        assert.same({ 'services.lua: service "sso.api": field "health.timeout" must be a number, got string "30s"' },
          problems_of(one({ health = { url = "http://h/", timeout = "30s" } })))
      end)
    end)

    it("checks stabilize and the job timeouts", function()
      assert.same({
        'services.lua: service "sso.api": field "stabilize" must be a number of seconds from 0 to 86400 (24 h), got -2',
        'services.lua: service "sso.api": field "start_timeout" must be a number of seconds from 1 to 86400 (24 h), got 0',
        'services.lua: service "sso.api": field "stop_timeout" must be a number, got string "5"',
      }, problems_of(one({ stabilize = -2, start_timeout = 0, stop_timeout = "5" })))
      assert.is_truthy(services.validate(one({ stabilize = 0 })))
    end)

    it("takes migrate_timeout and deploy_timeout per service and from defaults", function()
      local platform = assert(services.validate({
        defaults = { migrate_timeout = 900, deploy_timeout = 120 },
        services = {
          { name = "a", unit = "a.service", working_dir = "/srv/a", migrate = { "make", "migrate" } },
          { name = "b", unit = "b.service", working_dir = "/srv/b", migrate = { "make", "migrate" },
            migrate_timeout = 30, deploy_timeout = 2.5 },
        },
      }, "services.lua"))
      assert.equal(900, platform.services[1].migrate_timeout)
      assert.equal(120, platform.services[1].deploy_timeout)
      assert.equal(30, platform.services[2].migrate_timeout)
      assert.equal(2.5, platform.services[2].deploy_timeout)
      -- absent everywhere: nil, the flow's own default applies
      local plain = assert(services.validate(one({ working_dir = "/srv/api", migrate = { "x" } })))
      assert.is_nil(plain.services[1].migrate_timeout)
      assert.is_nil(plain.services[1].deploy_timeout)
      -- a lone timeout (no migrate, no working_dir) is accepted: it bounds nothing that runs
      assert.is_truthy(services.validate(one({ migrate_timeout = 5, deploy_timeout = 5 })))
    end)

    it("checks the ranges of migrate_timeout and deploy_timeout", function()
      assert.same({
        'services.lua: service "sso.api": field "migrate_timeout" must be a number of seconds from 1 to 86400 (24 h), got 0',
        'services.lua: service "sso.api": field "deploy_timeout" must be a number, got string "60"',
      }, problems_of(one({ migrate_timeout = 0, deploy_timeout = "60" })))
      assert.same({
        'services.lua: service "sso.api": field "migrate_timeout" must be a number of seconds from 1 to 86400 (24 h), got -1',
        'services.lua: service "sso.api": field "deploy_timeout" must be a number of seconds from 1 to 86400 (24 h), got inf',
      }, problems_of(one({ migrate_timeout = -1, deploy_timeout = math.huge })))
      assert.same({
        'services.lua: defaults: field "migrate_timeout" must be a number of seconds from 1 to 86400 (24 h), got -5',
        'services.lua: defaults: field "deploy_timeout" must be a number, got boolean true',
      }, problems_of({ defaults = { migrate_timeout = -5, deploy_timeout = true }, services = {} }))
      assert.same({ 'services.lua: service "sso.api": field "migrate_timout" is unknown (did you mean "migrate_timeout"?)' },
        problems_of(one({ migrate_timout = 10 })))
    end)

    describe("number ranges", function()
      -- What a fault injector tried: each was accepted, then failed (or was skipped) at run time.
      local SECONDS = "must be a number of seconds from 1 to 86400 (24 h), got "

      it("rejects timeouts below a second or above 24 h, nan and inf, naming the service and the field", function()
        assert.same({
          'services.lua: service "sso.api": field "health.timeout" ' .. SECONDS .. "1000000000",
          'services.lua: service "sso.api": field "start_timeout" ' .. SECONDS .. "1e-09",
          'services.lua: service "sso.api": field "stop_timeout" ' .. SECONDS .. "0.5",
          'services.lua: service "sso.api": field "migrate_timeout" ' .. SECONDS .. "1000000000",
          'services.lua: service "sso.api": field "deploy_timeout" ' .. SECONDS .. "nan",
        }, problems_of(one({ health = { url = "http://h/", timeout = 1e9 }, start_timeout = 1e-9,
          stop_timeout = 0.5, migrate_timeout = 1e9, deploy_timeout = 0 / 0 })))
        assert.same({
          'services.lua: service "sso.api": field "start_timeout" ' .. SECONDS .. "86401",
          'services.lua: service "sso.api": field "stop_timeout" ' .. SECONDS .. "-inf",
        }, problems_of(one({ start_timeout = 86401, stop_timeout = -math.huge })))
      end)

      it("rejects a stabilization longer than 24 h, and nan", function()
        assert.same({ 'services.lua: service "sso.api": field "stabilize" must be a number of seconds '
          .. 'from 0 to 86400 (24 h), got 1000000000' }, problems_of(one({ stabilize = 1e9 })))
        assert.same({ 'services.lua: service "sso.api": field "stabilize" must be a number of seconds '
          .. 'from 0 to 86400 (24 h), got nan' }, problems_of(one({ stabilize = 0 / 0 })))
      end)

      it("rejects an interval below 10 ms, and retries that are not a whole number up to 10000", function()
        assert.same({
          'services.lua: service "sso.api": field "health.retries" must be an integer from 0 to 10000, got 10001',
          'services.lua: service "sso.api": field "health.interval" must be a number of seconds '
            .. 'from 0.01 to 86400 (24 h), got 1e-09',
        }, problems_of(one({ health = { url = "http://h/", retries = 10001, interval = 1e-9 } })))
        assert.same({
          'services.lua: service "sso.api": field "health.retries" must be an integer from 0 to 10000, got nan',
        }, problems_of(one({ health = { url = "http://h/", retries = 0 / 0 } })))
        assert.same({
          'services.lua: service "sso.api": field "health.retries" must be an integer from 0 to 10000, got 1e+300',
        }, problems_of(one({ health = { url = "http://h/", retries = 1e300 } })))
      end)

      it("checks every number of defaults the same way", function()
        assert.same({
          'services.lua: defaults: field "health.timeout" ' .. SECONDS .. "1e-09",
          'services.lua: defaults: field "health.retries" must be an integer from 0 to 10000, got -1',
          'services.lua: defaults: field "health.interval" must be a number of seconds from 0.01 to 86400 (24 h), '
            .. 'got inf',
          'services.lua: defaults: field "stabilize" must be a number of seconds from 0 to 86400 (24 h), got 1000000000',
          'services.lua: defaults: field "start_timeout" ' .. SECONDS .. "0.001",
          'services.lua: defaults: field "stop_timeout" ' .. SECONDS .. "1000000000",
          'services.lua: defaults: field "migrate_timeout" ' .. SECONDS .. "nan",
          'services.lua: defaults: field "deploy_timeout" ' .. SECONDS .. "86400.5",
        }, problems_of({ defaults = { health = { timeout = 1e-9, retries = -1, interval = math.huge },
          stabilize = 1e9, start_timeout = 0.001, stop_timeout = 1e9, migrate_timeout = 0 / 0,
          deploy_timeout = 86400.5 }, services = {} }))
      end)

      it("accepts every bound", function()
        local platform = assert(services.validate({
          defaults = { health = { timeout = 86400, retries = 10000, interval = 0.01 }, stabilize = 86400,
            start_timeout = 1, stop_timeout = 86400, migrate_timeout = 1, deploy_timeout = 86400 },
          services = {
            { name = "a", unit = "a.service" },
            { name = "b", unit = "b.service", stabilize = 0, start_timeout = 86400, stop_timeout = 1,
              health = { url = "http://h/", timeout = 1, retries = 0, interval = 1 } },
          },
        }, "services.lua"))
        assert.same({ kind = "systemd", timeout = 86400, retries = 10000, interval = 0.01 },
          platform.services[1].health)
        assert.same({ 86400, 1, 86400, 1, 86400 }, { platform.services[1].stabilize, platform.services[1].start_timeout,
          platform.services[1].stop_timeout, platform.services[1].migrate_timeout, platform.services[1].deploy_timeout })
        assert.same({ kind = "http", url = "http://h/", timeout = 1, retries = 0, interval = 1 },
          platform.services[2].health)
        assert.same({ 0, 86400, 1 }, { platform.services[2].stabilize, platform.services[2].start_timeout,
          platform.services[2].stop_timeout })
      end)

      it("rejects an interval longer than the timeout, naming where each came from", function()
        assert.same({ 'services.lua: service "sso.api": field "health.interval" must not be longer than '
          .. '"health.timeout" (5), got 10' },
          problems_of(one({ health = { url = "http://h/", timeout = 5, interval = 10 } })))
        assert.same({ 'services.lua: service "a": field "health.interval" must not be longer than '
          .. '"health.timeout" (20, from defaults), got 60' },
          problems_of({ defaults = { health = { timeout = 20 } },
            services = { { name = "a", unit = "a.service", health = { url = "http://h/", interval = 60 } } } }))
        assert.same({ 'services.lua: service "a": field "health.timeout" must not be shorter than '
          .. '"health.interval" (5, from defaults), got 2' },
          problems_of({ defaults = { health = { interval = 5 } },
            services = { { name = "a", unit = "a.service", health = { url = "http://h/", timeout = 2 } } } }))
        -- in defaults, once, and not again for each service that inherits both
        assert.same({ 'services.lua: defaults: field "health.interval" must not be longer than '
          .. '"health.timeout" (30, built in), got 60' },
          problems_of({ defaults = { health = { interval = 60 } },
            services = { { name = "a", unit = "a.service" }, { name = "b", unit = "b.service", health = { url = "http://h/" } } } }))
        -- a value already rejected is not compared again
        assert.same({ 'services.lua: service "sso.api": field "health.timeout" ' .. SECONDS .. "0.5" },
          problems_of(one({ health = { url = "http://h/", timeout = 0.5, interval = 0.8 } })))
      end)
    end)

    it("bounds the time spent on hints for a file with many unknown dependencies", function()
      -- 1,000 services, each with its own mistyped dependency: every typo is compared with
      -- every name, so past a budget the rest are reported without a hint.
      local list = {}
      for i = 1, 1000 do
        list[i] = { name = ("svc-%04d"):format(i), unit = ("svc-%04d.service"):format(i),
          depends = { ("svc-%04dx"):format(i) } }
      end
      local problems = problems_of({ services = list })
      assert.equal(1000, #problems)
      assert.equal('services.lua: service "svc-0001": field "depends" names unknown service "svc-0001x" '
        .. '(did you mean "svc-0001"?)', problems[1])
      assert.equal('services.lua: service "svc-1000": field "depends" names unknown service "svc-1000x"',
        problems[1000])
      local hinted = 0
      for i, problem in ipairs(problems) do
        if problem:find("did you mean", 1, true) then
          assert.equal(i, hinted + 1) -- the hints are the first ones, in report order
          hinted = i
        end
      end
      assert.is_true(hinted >= 10 and hinted < 1000)
      -- one typo repeated everywhere is looked up once: every line has its hint
      for i = 1, 1000 do list[i].depends = { "svc-00001" } end
      for _, problem in ipairs(problems_of({ services = list })) do
        assert.matches('names unknown service "svc-00001" (did you mean "svc-0001"?)', problem, 1, true)
      end
    end)

    it("requires absolute paths and resolves hooks against the file's directory", function()
      assert.same({ 'services.lua: service "sso.api": field "working_dir" must be an absolute path, got "srv/api"' },
        problems_of(one({ working_dir = "srv/api" })))
      local platform = assert(services.validate(one({ hooks = "hooks/sso.lua" }), "/etc/rrengine/services.lua"))
      assert.equal("/etc/rrengine/hooks/sso.lua", platform.services[1].hooks)
      platform = assert(services.validate(one({ hooks = "/opt/hooks/sso.lua" }), "/etc/rrengine/services.lua"))
      assert.equal("/opt/hooks/sso.lua", platform.services[1].hooks)
      platform = assert(services.validate(one({ hooks = "hooks/sso.lua" }), "services.lua"))
      assert.equal("hooks/sso.lua", platform.services[1].hooks)
      platform = assert(services.validate(one({ hooks = "h.lua" }), "repl", "/srv/platform"))
      assert.equal("/srv/platform/h.lua", platform.services[1].hooks)
    end)

    it("checks migrate and migrate_rollback as argv arrays run in working_dir", function()
      assert.same({
        'services.lua: service "sso.api": field "migrate" must not be empty (an argv array: { "program", "arg", ... })',
        'services.lua: service "sso.api": field "migrate_rollback" must be an argv array of strings, got string "npm run down"',
      }, problems_of(one({ working_dir = "/srv", migrate = {}, migrate_rollback = "npm run down" })))
      assert.same({ 'services.lua: service "sso.api": field "migrate[2]" must be a string, got number 1' },
        problems_of(one({ working_dir = "/srv", migrate = { "make", 1 } })))
      assert.same({ 'services.lua: service "sso.api": field "migrate" needs "working_dir" (the command runs there)' },
        problems_of(one({ migrate = { "make", "migrate" } })))
    end)

    it("reports unknown, self and repeated dependencies", function()
      assert.same({
        'services.lua: service "api": field "depends" names unknown service "sso.redsi" (did you mean "sso.redis"?)',
        'services.lua: service "api": field "depends" names the service itself',
        'services.lua: service "api": field "depends" lists "sso.redis" more than once',
      }, problems_of({ services = {
        { name = "sso.redis", unit = "redis.service" },
        { name = "api", unit = "api.service", depends = { "sso.redsi", "api", "sso.redis", "sso.redis" } },
      } }))
      assert.same({ 'services.lua: service "api": field "depends" must be an array of service names, '
        .. 'got string "db"' }, problems_of({ services = { { name = "api", unit = "api.service", depends = "db" } } }))
    end)

    it("accepts a dependency declared later", function()
      assert.is_truthy(services.validate({ services = {
        { name = "api", unit = "api.service", depends = { "db" } },
        { name = "db", unit = "db.service" },
      } }))
    end)

    it("prints every dependency cycle", function()
      assert.same({
        'services.lua: service "a": field "depends" forms a dependency cycle: a -> b -> c -> a',
        'services.lua: service "x": field "depends" forms a dependency cycle: x -> y -> x',
      }, problems_of({ services = {
        { name = "a", unit = "a.service", depends = { "b" } },
        { name = "b", unit = "b.service", depends = { "c" } },
        { name = "c", unit = "c.service", depends = { "a" } },
        { name = "x", unit = "x.service", depends = { "y" } },
        { name = "y", unit = "y.service", depends = { "x" } },
        { name = "z", unit = "z.service", depends = { "x" } },
      } }))
    end)

    it("reports all problems of all services at once", function()
      local problems = problems_of({
        extra = true,
        services = {
          { name = "a", unit = "a.service", depends = { "b" }, helth = "systemd" },
          { name = "b", unit = "b", depends = { "a" }, health = { url = "ftp://x" } },
          { unit = 3, reload = "yes" },
        },
      })
      assert.same({
        'services.lua: field "extra" is unknown',
        'services.lua: service "a": field "helth" is unknown (did you mean "health"?)',
        'services.lua: service "b": field "unit" is not a valid systemd unit name: "b" must end in '
          .. '.service, .socket, .target, .timer, .mount, .path',
        'services.lua: service "b": field "health.url" is not an http:// or https:// URL: "ftp://x" '
          .. '(expected http://HOST[:PORT]/PATH or https://...)',
        'services.lua: services[3]: field "name" is required',
        'services.lua: services[3]: field "unit" must be a string, got number 3',
        'services.lua: services[3]: field "reload" must be a boolean, got string "yes"',
        'services.lua: service "a": field "depends" forms a dependency cycle: a -> b -> a',
      }, problems)
    end)

    it("accepts an empty platform and defaults the source name", function()
      local platform = assert(services.validate({ services = {} }))
      assert.equal("services", platform.source)
      assert.same({}, platform.services)
      assert.same({ 'services: field "services" is required (a list of { name = ..., unit = ... })' },
        select(2, services.validate({})))
    end)

    describe("groups", function()
      -- A group of three replicas with `group` fields, plus the given group settings.
      local function replicas(settings, extra)
        local tbl = { groups = { ["sso.api"] = settings }, services = {} }
        for i = 1, 3 do
          local entry = { name = "sso.api." .. i, unit = "lilith-sso-api@" .. i .. ".service", group = "sso.api" }
          for k, v in pairs(extra and extra[i] or {}) do entry[k] = v end
          tbl.services[i] = entry
        end
        return tbl
      end

      it("normalizes a group: members in declaration order, the budget resolved, servers named", function()
        local tbl = replicas({ max_unavailable = "67%", drain_timeout = 10,
                               balancer = { haproxy = "/run/haproxy/admin.sock", backend = "sso_api" } },
                             { nil, { balancer_server = "api2" } })
        table.insert(tbl.services, 1, { name = "db", unit = "db.service" })
        tbl.services[3].depends = { "db" }
        local platform = assert(services.validate(tbl, "/etc/rrengine/services.lua"))
        assert.same({ ["sso.api"] = {
          name = "sso.api", max_unavailable = "67%", max_unavailable_count = 2, drain_timeout = 10,
          balancer = { haproxy = "/run/haproxy/admin.sock", backend = "sso_api" },
          members = { "sso.api.1", "sso.api.2", "sso.api.3" },
        } }, platform.groups)
        assert.equal("sso.api", platform.by_name["sso.api.1"].group)
        assert.equal("sso.api.1", platform.by_name["sso.api.1"].balancer_server)
        assert.equal("api2", platform.by_name["sso.api.2"].balancer_server)
        assert.equal("sso.api.3", platform.by_name["sso.api.3"].balancer_server)
        assert.is_nil(platform.by_name.db.group)
        assert.is_nil(platform.by_name.db.balancer_server)
      end)

      it("defaults: a budget of 1, a drain timeout of 30 s, no balancer, no server names", function()
        local platform = assert(services.validate(replicas({}), "services.lua"))
        local group = platform.groups["sso.api"]
        assert.equal(1, group.max_unavailable)
        assert.equal(1, group.max_unavailable_count)
        assert.equal(30, group.drain_timeout)
        assert.is_nil(group.balancer)
        assert.is_nil(platform.services[1].balancer_server)
        assert.same({}, assert(services.validate({ services = {} })).groups)
      end)

      it("resolves a percentage of the members, rounded down", function()
        for percent, count in pairs({ ["34%"] = 1, ["66%"] = 1, ["67%"] = 2, ["100%"] = 3 }) do
          local platform = assert(services.validate(replicas({ max_unavailable = percent })))
          assert.equal(count, platform.groups["sso.api"].max_unavailable_count, percent)
          assert.equal(percent, platform.groups["sso.api"].max_unavailable, percent)
        end
        -- a count larger than the group is kept as written: every member may go at once
        assert.equal(5, assert(services.validate(replicas({ max_unavailable = 5 }))).groups["sso.api"].max_unavailable_count)
        assert.equal(2, assert(services.validate(replicas({ max_unavailable = 2.0 }))).groups["sso.api"].max_unavailable_count)
      end)

      it("refuses a budget that is neither a count >= 1 nor a percentage from 1% to 100%", function()
        for _, case in ipairs({ { 0, "number 0" }, { -1, "number -1" }, { 1.5, "number 1.5" }, { "0%", 'string "0%"' },
                                { "101%", 'string "101%"' }, { "34.5%", 'string "34.5%"' }, { "2", 'string "2"' },
                                { " 34%", 'string " 34%"' }, { true, "boolean true" }, { 0 / 0, "number " .. tostring(0 / 0) } }) do
          assert.same({ 'services.lua: group "sso.api": field "max_unavailable" must be a number of members (a whole '
            .. 'number >= 1) or a percentage "N%" from "1%" to "100%", got ' .. case[2] },
            problems_of(replicas({ max_unavailable = case[1] })), tostring(case[1]))
        end
      end)

      it("refuses a percentage that resolves to 0 members: that budget can never be met", function()
        assert.same({ 'services.lua: group "sso.api": field "max_unavailable" "33%" of 3 members is 0 members: the budget '
          .. 'can never be met (no member could ever be taken down; use at least 34%, or a count)' },
          problems_of(replicas({ max_unavailable = "33%" })))
      end)

      it("refuses a group without members, and a member of an unknown group", function()
        local tbl = replicas({})
        tbl.groups.spare = { max_unavailable = 1 }
        tbl.services[2].group = "sso.apii"
        assert.same({
          'services.lua: service "sso.api.2": field "group" names unknown group "sso.apii" (did you mean "sso.api"?)',
          'services.lua: group "spare": has no members (no service says group = "spare")',
        }, problems_of(tbl))
      end)

      it("names unknown fields of a group, its balancer and its canary, with a hint", function()
        assert.same({
          'services.lua: group "sso.api": field "max_unavailble" is unknown (did you mean "max_unavailable"?)',
          'services.lua: group "sso.api": field "balancer.backends" is unknown (did you mean "balancer.backend"?)',
          'services.lua: group "sso.api": field "canary.sok" is unknown (did you mean "canary.soak"?)',
        }, problems_of(replicas({ max_unavailble = 1,
                                  balancer = { haproxy = "/run/h.sock", backend = "b", backends = "c" },
                                  canary = { sok = 3 } })))
      end)

      it("refuses group names and group entries of the wrong shape", function()
        assert.same({
          'services.lua: field "groups" must be keyed by group name, got key [1]',
          'services.lua: field "groups": group name "bad name" must be letters, digits and . _ : @ - (starting with a '
            .. 'letter or digit)',
          'services.lua: group "x": must be a table { max_unavailable = ..., balancer = ..., drain_timeout = ... }, got '
            .. 'number 2',
        }, problems_of({ groups = { { max_unavailable = 1 }, ["bad name"] = {}, x = 2 }, services = {} }))
        assert.same({ 'services.lua: field "groups" must be a table keyed by group name, got string "sso.api"' },
          problems_of({ groups = "sso.api", services = {} }))
      end)

      it("refuses members that depend on each other, directly or through other services, naming both", function()
        local tbl = replicas({}, { nil, { depends = { "sso.api.1" } }, { depends = { "cache" } } })
        tbl.services[#tbl.services + 1] = { name = "cache", unit = "cache.service", depends = { "sso.api.1" } }
        tbl.services[1].depends = { "db" }
        tbl.services[#tbl.services + 1] = { name = "db", unit = "db.service" }
        assert.same({
          'services.lua: group "sso.api": member "sso.api.2" depends on member "sso.api.1" (sso.api.2 -> sso.api.1): '
            .. 'the members of a group are replicas that roll side by side within its budget, so none may depend on another',
          'services.lua: group "sso.api": member "sso.api.3" depends on member "sso.api.1" (sso.api.3 -> cache -> '
            .. 'sso.api.1): the members of a group are replicas that roll side by side within its budget, so none may '
            .. 'depend on another',
        }, problems_of(tbl))
        -- a dependency every member shares is fine, and so is a service that depends on the group
        tbl = replicas({}, { { depends = { "db" } }, { depends = { "db" } }, { depends = { "db" } } })
        tbl.services[4] = { name = "db", unit = "db.service" }
        tbl.services[5] = { name = "gateway", unit = "gw.service", depends = { "sso.api.1", "sso.api.2" } }
        assert.is_truthy(services.validate(tbl))
      end)

      it("checks a HAProxy balancer: socket path or HOST:PORT, backend name, timeouts", function()
        for _, addr in ipairs({ "/run/haproxy/admin.sock", "127.0.0.1:9999", "lb.internal:1", "[::1]:65535" }) do
          assert.is_truthy(services.validate(replicas({ balancer = { haproxy = addr, backend = "a-b_c.d:e" } })), addr)
        end
        assert.same({
          'services.lua: group "sso.api": field "balancer.haproxy" must be the admin socket\'s absolute path or '
            .. 'HOST:PORT, got "run/haproxy.sock"',
          'services.lua: group "sso.api": field "balancer.backend" must be letters, digits and . - _ : (an HAProxy '
            .. 'backend name), got "sso api"',
          'services.lua: group "sso.api": field "balancer.timeout" must be a number of seconds from 1 to 86400 (24 h), got 0',
          'services.lua: group "sso.api": field "balancer.interval" must be a number of seconds from 0.01 to 86400 '
            .. '(24 h), got 0.001',
        }, problems_of(replicas({ balancer = { haproxy = "run/haproxy.sock", backend = "sso api", timeout = 0,
                                               interval = 0.001 } })))
        assert.same({
          'services.lua: group "sso.api": field "balancer.haproxy" must be the admin socket\'s absolute path or '
            .. 'HOST:PORT, got "127.0.0.1:0"',
        }, problems_of(replicas({ balancer = { haproxy = "127.0.0.1:0", backend = "b" } })))
        assert.same({
          'services.lua: group "sso.api": field "balancer.haproxy" is required when "balancer" is a table (HAProxy\'s '
            .. 'admin socket: an absolute path or HOST:PORT)',
          'services.lua: group "sso.api": field "balancer.backend" is required when "balancer" is a table (the HAProxy '
            .. 'backend of the group\'s servers)',
        }, problems_of(replicas({ balancer = {} })))
        assert.same({ 'services.lua: group "sso.api": field "balancer" must be { haproxy = SOCKET, backend = NAME } or '
          .. 'the path of a Lua script, got number 1' }, problems_of(replicas({ balancer = 1 })))
        assert.same({ 'services.lua: group "sso.api": field "balancer" must not be empty' },
          problems_of(replicas({ balancer = "" })))
        local platform = assert(services.validate(replicas({ balancer = { haproxy = "/h.sock", backend = "b", timeout = 2,
                                                                       interval = 0.05 } })))
        assert.same({ haproxy = "/h.sock", backend = "b", timeout = 2, interval = 0.05 }, platform.groups["sso.api"].balancer)
        assert.same({ 'services.lua: group "sso.api": field "drain_timeout" must be a number of seconds from 1 to 86400 '
          .. '(24 h), got 86401' }, problems_of(replicas({ drain_timeout = 86401 })))
      end)

      it("resolves a balancer script against the services file's directory, as hooks", function()
        local platform = assert(services.validate(replicas({ balancer = "hooks/nginx.lua" }), "/etc/rrengine/services.lua"))
        assert.equal("/etc/rrengine/hooks/nginx.lua", platform.groups["sso.api"].balancer)
        platform = assert(services.validate(replicas({ balancer = "/opt/lb.lua" }), "/etc/rrengine/services.lua"))
        assert.equal("/opt/lb.lua", platform.groups["sso.api"].balancer)
        platform = assert(services.validate(replicas({ balancer = "hooks/nginx.lua" }), "services.lua"))
        assert.equal("hooks/nginx.lua", platform.groups["sso.api"].balancer)
        -- a script names members by their service name: no HAProxy name rule for them
        platform = assert(services.validate({ groups = { w = { balancer = "lb.lua" } },
          services = { { name = "worker@1", unit = "worker@1.service", group = "w" } } }, "services.lua"))
        assert.equal("worker@1", platform.services[1].balancer_server)
      end)

      it("checks balancer_server: an HAProxy name, in a group with a balancer, once per group", function()
        local tbl = replicas({ balancer = { haproxy = "/h.sock", backend = "b" } },
          { { balancer_server = "api 1" }, { balancer_server = "sso.api.3" } })
        tbl.services[4] = { name = "lone", unit = "lone.service", balancer_server = "lone" }
        tbl.groups.plain = {}
        tbl.services[5] = { name = "p.1", unit = "p1.service", group = "plain", balancer_server = "p1" }
        tbl.services[6] = { name = "w@1", unit = "w1.service", group = "sso.api" }
        assert.same({
          'services.lua: service "sso.api.1": field "balancer_server" must be letters, digits and . - _ : (an HAProxy '
            .. 'server name), got "api 1"',
          'services.lua: service "lone": field "balancer_server" needs "group" (the name of the member\'s server at its '
            .. 'group\'s balancer)',
          'services.lua: service "p.1": field "balancer_server" needs a balancer: group "plain" has none',
          'services.lua: service "sso.api.3": balancer server "sso.api.3" is also the server of service "sso.api.2" in '
            .. 'group "sso.api"',
          'services.lua: service "w@1": its name is not an HAProxy server name (letters, digits and . - _ :): set '
            .. '"balancer_server" to the server\'s name in backend "b"',
        }, problems_of(tbl))
      end)

      it("keeps the reserved canary, validated: count, soak, analysis", function()
        local platform = assert(services.validate(replicas({ canary = { count = "34%", soak = 120,
          analysis = "hooks/canary.lua" } }), "/etc/rrengine/services.lua"))
        assert.same({ count = "34%", count_members = 1, soak = 120, analysis = "/etc/rrengine/hooks/canary.lua" },
          platform.groups["sso.api"].canary)
        platform = assert(services.validate(replicas({ canary = {} })))
        assert.same({ count = 1, count_members = 1 }, platform.groups["sso.api"].canary)
        assert.same({
          'services.lua: group "sso.api": field "canary.count" must be a number of members (a whole number >= 1) or a '
            .. 'percentage "N%" from "1%" to "100%", got number 0',
          'services.lua: group "sso.api": field "canary.soak" must be a number of seconds from 0 to 86400 (24 h), got -1',
          'services.lua: group "sso.api": field "canary.analysis" must be a string, got number 3',
        }, problems_of(replicas({ canary = { count = 0, soak = -1, analysis = 3 } })))
        assert.same({ 'services.lua: group "sso.api": field "canary.count" "10%" of 3 members is 0 members: no member '
          .. 'would roll first (use at least 34%, or a count)' }, problems_of(replicas({ canary = { count = "10%" } })))
        assert.same({ 'services.lua: group "sso.api": field "canary" must be a table { count = ..., soak = ..., '
          .. 'analysis = ... }, got boolean true' }, problems_of(replicas({ canary = true })))
      end)

      it("checks the canary's weight: 1 to 256 or \"1%\" to \"100%\", and only with a balancer", function()
        local hp = { haproxy = "/h.sock", backend = "b" }
        local platform = assert(services.validate(replicas({ balancer = hp, canary = { weight = 10 } })))
        assert.equal(10, platform.groups["sso.api"].canary.weight)
        platform = assert(services.validate(replicas({ balancer = hp, canary = { weight = "5%" } })))
        assert.equal("5%", platform.groups["sso.api"].canary.weight)
        platform = assert(services.validate(replicas({ balancer = "lb.lua", canary = { weight = 256 } })))
        assert.equal(256, platform.groups["sso.api"].canary.weight)
        for _, bad in ipairs({ 0, 257, 1.5, "0%", "101%", "10", true }) do
          local problems = problems_of(replicas({ balancer = hp, canary = { weight = bad } }))
          assert.equal(1, #problems, tostring(bad))
          assert.matches('^services%.lua: group "sso%.api": field "canary%.weight" must be a balancer weight %(a whole '
            .. 'number from 1 to 256%) or a percentage of the server\'s configured weight "N%%" from "1%%" to "100%%", got ',
            problems[1])
        end
        assert.same({ 'services.lua: group "sso.api": field "canary.weight" needs a "balancer" (the weight is the '
          .. 'canary\'s server weight there)' }, problems_of(replicas({ canary = { weight = 10 } })))
      end)

      it("loads a file with groups, bracketed names and all", function()
        local path = fixture([[
          return {
            groups = { ["sso.api"] = { max_unavailable = 1, drain_timeout = 5,
                                       balancer = { haproxy = "127.0.0.1:9999", backend = "sso_api" } } },
            services = {
              { name = "sso.api.1", unit = "a@1.service", group = "sso.api", balancer_server = "api1" },
              { name = "sso.api.2", unit = "a@2.service", group = "sso.api" },
            },
          }
        ]])
        local platform = assert(services.load(path))
        assert.same({ "sso.api.1", "sso.api.2" }, platform.groups["sso.api"].members)
        assert.equal("api1", platform.by_name["sso.api.1"].balancer_server)
        assert.equal(5, platform.groups["sso.api"].drain_timeout)
      end)
    end)

    describe("hosts", function()
      it("puts a service on its host, or on the top-level host, or here (nil, or host = false)", function()
        local platform = assert(services.validate({
          host = "deploy@db1",
          services = {
            { name = "db", unit = "db.service" },
            { name = "api", unit = "api.service", host = "web1" },
            { name = "v6", unit = "v6.service", host = "ops@[2001:db8::1]" },
            { name = "here", unit = "here.service", host = false },
          },
        }, "services.lua"))
        assert.equal("deploy@db1", platform.host)
        assert.equal("deploy@db1", platform.by_name.db.host)
        assert.equal("web1", platform.by_name.api.host)
        -- ssh takes "[::1]" for a name: the brackets go
        assert.equal("ops@2001:db8::1", platform.by_name.v6.host)
        assert.is_nil(platform.by_name.here.host)
        local remote = services.remote_services(platform)
        assert.equal(3, #remote)
        assert.equal("db", remote[1].name)
      end)

      it("takes one unit name once per host", function()
        assert(services.validate({ host = "h1", services = {
          { name = "a1", unit = "a.service" }, { name = "a2", unit = "a.service", host = "h2" },
          { name = "a", unit = "a.service", host = false } } }, "services.lua"))
        assert.same({ "services.lua: service \"a2\": field \"unit\" \"a.service\" is also the unit of service \"a1\" "
          .. "on host h1" }, problems_of({ host = "h1", services = {
          { name = "a1", unit = "a.service" }, { name = "a2", unit = "a.service" } } }))
      end)

      it("leaves a platform without hosts on this machine", function()
        local platform = assert(services.validate(one(), "services.lua"))
        assert.is_nil(platform.by_name["sso.api"].host)
        assert.same({}, services.remote_services(platform))
      end)

      it("refuses what is not an ssh destination, one line naming the service and the field", function()
        local cases = {
          { "-oProxyCommand=touch /tmp/x", "contains whitespace or control characters" },
          { "-oProxyCommand=x", "must not start with \"-\" (ssh would take it for an option)" },
          { "web 1", "contains whitespace or control characters" },
          { "web1\n", "contains whitespace or control characters" },
          { "", "must not be empty" },
          { "a@b@c", "has a bad user name (letters, digits and . _ - before \"@\")" },
          { "@web1", "has a bad user name (letters, digits and . _ - before \"@\")" },
          { "u@", "must be NAME, USER@NAME or [IPV6] (a name: letters, digits and . _ -)" },
          { "web1:22", "must be NAME, USER@NAME or [IPV6] (a name: letters, digits and . _ -)" },
          { "[web1]", "must be NAME, USER@NAME or [IPV6] (a name: letters, digits and . _ -)" },
          { "[1.2.3.4]", "has brackets around something that is not an IPv6 address" },
        }
        for _, case in ipairs(cases) do
          local problems = problems_of(one({ host = case[1] }))
          assert.same({ ("services.lua: service \"sso.api\": field \"host\" %s, got string %s (an ssh destination: "
            .. "NAME, USER@NAME, USER@[IPV6])"):format(case[2], ("%q"):format(case[1]):gsub("\\\n", "\\n")) }, problems)
        end
        assert.same({ "services.lua: service \"sso.api\": field \"host\" must be a string, got number 1 (an ssh "
          .. "destination: NAME, USER@NAME, USER@[IPV6])" }, problems_of(one({ host = 1 })))
        local top = one()
        top.host = "-x"
        assert.same({ "services.lua: field \"host\" must not start with \"-\" (ssh would take it for an option), got "
          .. "string \"-x\" (an ssh destination: NAME, USER@NAME, USER@[IPV6])" }, problems_of(top))
        top.host = false
        assert.same({ "services.lua: field \"host\" must be a string, got boolean false (an ssh destination: NAME, "
          .. "USER@NAME, USER@[IPV6])" }, problems_of(top))
      end)
    end)

    it("raises on misuse", function()
      assert.has_error(function() services.load(42) end, "rr.services.load: path must be a string, got number")
      assert.has_error(function() services.validate({}, 1) end,
        "rr.services.validate: source_name must be a string, got number")
    end)
  end)
end)
