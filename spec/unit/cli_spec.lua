-- Specs for rr.cli: the generic parser, the rolling.lua spec and its rules.
local cli = require("rr.cli")

-- A small spec exercising every option form.
local spec = {
  usage = "rrengine plans/x.lua [options]",
  options = {
    { name = "file", type = "string", value = "FILE", default = "x.lua", help = "the file" },
    { name = "name", key = "names", type = "string", value = "NAME", repeatable = true, split = ",",
      help = "a name" },
    { name = "tag", type = "string", value = "TAG", repeatable = true, help = "a tag" },
    { name = "count", type = "number", value = "N", help = "a count" },
    { name = "dry-run", help = "change nothing" },
    { name = "force", help = "no checks" },
    { name = "help", short = "h", help = "show this help" },
  },
}

describe("rr.cli", function()
  describe("parse", function()
    it("fills defaults: false for flags, declared defaults, nil for the rest", function()
      assert.same({ args = {}, file = "x.lua", dry_run = false, force = false, help = false },
        cli.parse({}, spec))
    end)

    it("accepts --opt value and --opt=value", function()
      local opts = assert(cli.parse({ "--file", "a.lua", "--count=3", "--dry-run" }, spec))
      assert.equal("a.lua", opts.file)
      assert.equal(3, opts.count)
      assert.equal("integer", math.type(opts.count))
      assert.equal(true, opts.dry_run)
      assert.equal("b=c.lua", assert(cli.parse({ "--file=b=c.lua" }, spec)).file)
    end)

    it("parses decimal numbers only", function()
      assert.equal(2.5, assert(cli.parse({ "--count", "2.5" }, spec)).count)
      assert.equal(-1, assert(cli.parse({ "--count=-1" }, spec)).count)
      assert.equal(0.5, assert(cli.parse({ "--count", ".5" }, spec)).count)
      assert.equal(3, assert(cli.parse({ "--count", "3." }, spec)).count)
      for _, bad in ipairs({ "x", "0x10", "1e3", "inf", "nan", " 1", ".", "+", "1.2.3" }) do
        assert.same({ nil, ('option --count expects a number, got %q'):format(bad) },
          { cli.parse({ "--count=" .. bad }, spec) })
      end
    end)

    it("collects repeatable options and splits comma lists, without repeats", function()
      local opts = assert(cli.parse({ "--name", "a, b", "--name=c,a", "--tag", "x,y", "--tag", "z" }, spec))
      assert.same({ "a", "b", "c" }, opts.names)
      assert.same({ "x,y", "z" }, opts.tag)
    end)

    it("rejects an empty item in a comma list", function()
      assert.same({ nil, 'option --name has an empty NAME in "a,,b"' }, { cli.parse({ "--name", "a,,b" }, spec) })
      assert.same({ nil, 'option --name has an empty NAME in " , a"' }, { cli.parse({ "--name", " , a" }, spec) })
    end)

    it("rejects an empty value for every kind of value option, in both forms", function()
      for _, case in ipairs({ { "file", "FILE" }, { "name", "NAME" }, { "tag", "TAG" }, { "count", "N" } }) do
        local want = ("option --%s needs a value (%s), got an empty string"):format(case[1], case[2])
        assert.same({ nil, want }, { cli.parse({ "--" .. case[1], "" }, spec) })
        assert.same({ nil, want }, { cli.parse({ "--" .. case[1] .. "=" }, spec) })
      end
    end)

    it("collects positional arguments, all of them after --", function()
      local opts = assert(cli.parse({ "one", "--force", "-", "--", "--dry-run", "two" }, spec))
      assert.same({ "one", "-", "--dry-run", "two" }, opts.args)
      assert.equal(true, opts.force)
      assert.equal(false, opts.dry_run)
    end)

    it("accepts a short alias", function()
      assert.equal(true, assert(cli.parse({ "-h" }, spec)).help)
    end)

    it("rejects unknown options with a suggestion", function()
      assert.same({ nil, "unknown option --foo (did you mean --force?)" }, { cli.parse({ "--foo" }, spec) })
      assert.same({ nil, "unknown option --dry (did you mean --dry-run?)" }, { cli.parse({ "--dry" }, spec) })
      assert.same({ nil, "unknown option --dryrun (did you mean --dry-run?)" }, { cli.parse({ "--dryrun" }, spec) })
      assert.same({ nil, "unknown option --nmae (did you mean --name?)" }, { cli.parse({ "--nmae=a" }, spec) })
      assert.same({ nil, "unknown option --verbose" }, { cli.parse({ "--verbose" }, spec) })
      assert.same({ nil, "unknown option -x" }, { cli.parse({ "-x" }, spec) })
      assert.same({ nil, "unknown option -force (did you mean --force?)" }, { cli.parse({ "-force" }, spec) })
      assert.same({ nil, "unknown option --f (did you mean --file?)" }, { cli.parse({ "--f" }, spec) })
      assert.same({ nil, "unknown option -h=x" }, { cli.parse({ "-h=x" }, spec) })
    end)

    it("rejects a missing value, also when the next word is an option", function()
      assert.same({ nil, "option --file needs a value (FILE)" }, { cli.parse({ "--file" }, spec) })
      for _, next_word in ipairs({ "--force", "--", "--nosuch", "-h", "-x", "-force" }) do
        assert.same({ nil, "option --file needs a value (FILE)" }, { cli.parse({ "--file", next_word }, spec) })
        assert.same({ nil, "option --name needs a value (NAME)" }, { cli.parse({ "--name", next_word }, spec) })
      end
      assert.same({ nil, "option --count needs a value (N)" }, { cli.parse({ "--count" }, spec) })
      assert.same({ nil, "option --count needs a value (N)" }, { cli.parse({ "--count", "--force" }, spec) })
    end)

    it("takes - and a negative number as a value, and a value with a dash after =", function()
      assert.equal("-", assert(cli.parse({ "--file", "-" }, spec)).file)
      assert.equal(-1, assert(cli.parse({ "--count", "-1" }, spec)).count)
      assert.equal(-0.5, assert(cli.parse({ "--count", "-.5" }, spec)).count)
      assert.equal("--force", assert(cli.parse({ "--file=--force" }, spec)).file)
      assert.same({ "-x" }, assert(cli.parse({ "--name=-x" }, spec)).names)
    end)

    it("rejects a value given to a flag", function()
      assert.same({ nil, "option --force takes no value" }, { cli.parse({ "--force=yes" }, spec) })
    end)

    it("rejects a value option given twice, accepts a repeated flag", function()
      assert.same({ nil, "option --file given more than once" },
        { cli.parse({ "--file", "a", "--file=b" }, spec) })
      assert.equal(true, assert(cli.parse({ "--force", "--force" }, spec)).force)
    end)

    it("raises on misuse", function()
      assert.has_error(function() cli.parse("--force", spec) end,
        "rr.cli.parse: argv must be a list of strings, got string")
      assert.has_error(function() cli.parse({ 1 }, spec) end, "rr.cli.parse: argv[1] must be a string, got number")
      assert.has_error(function() cli.parse({}, {}) end, "rr.cli: spec must be a table with an options list")
      assert.has_error(function() cli.parse({}, { options = { { name = "x", type = "date" } } }) end,
        'rr.cli: option --x has unknown type "date"')
      assert.has_error(function() cli.parse({}, { options = { { name = "x", repeatable = true } } }) end,
        "rr.cli: boolean option --x cannot be repeatable or split")
      assert.has_error(function() cli.parse({}, { options = { { name = "x" }, { name = "y", short = "h" },
        { name = "x", short = "h" } } }) end, "rr.cli: option --x declared twice")
    end)
  end)

  describe("rolling.lua", function()
    it("parses the documented command line", function()
      local opts = assert(cli.parse_rolling({
        "--services", "/etc/rr/services.lua", "--service", "sso.api", "--deploy", "--deploy-path", "/tmp/d",
        "--skip-migrations", "--user", "--events", "/tmp/e.jsonl", "--parallel", "4", "--continue-on-error",
        "--json", "--hooks", "a.lua", "--hooks", "b.lua", "--dry-run", "--diff", "--force",
        "--accept-unknown-definition", "--journal",
      }))
      assert.same({
        args = {}, services_file = "/etc/rr/services.lua", service_names = { "sso.api" }, deploy = true,
        deploy_path = "/tmp/d", skip_migrations = true, user = true, events_file = "/tmp/e.jsonl",
        parallel = 4, continue_on_error = true, json = true, hook_files = { "a.lua", "b.lua" },
        dry_run = true, diff = true, force = true, accept_unknown_definition = true, journal = true,
        help = false, recover = false, resume = false, abandon = false, canary_only = false, promote = false,
      }, opts)
    end)

    it("--recover, --resume and --abandon: the combinations that make sense", function()
      assert.is_true(assert(cli.parse_rolling({ "--recover", "--resume" })).resume)
      assert.is_true(assert(cli.parse_rolling({ "--abandon" })).abandon)
      local _, err = cli.parse_rolling({ "--recover", "--abandon" })
      assert.matches("contradict", err)
      _, err = cli.parse_rolling({ "--resume" })
      assert.matches("%-%-resume goes with %-%-recover", err)
      _, err = cli.parse_rolling({ "--recover", "--dry-run" })
      assert.matches("cannot be a %-%-dry%-run", err)
    end)

    it("defaults to services.lua, every service, one at a time", function()
      local opts = assert(cli.parse_rolling({}))
      assert.equal("services.lua", opts.services_file)
      assert.is_nil(opts.service_names)
      assert.is_nil(opts.hook_files)
      assert.is_nil(opts.events_file)
      assert.equal(1, opts.parallel)
    end)

    it("takes --service repeated or as a comma list", function()
      assert.same({ "sso.redis", "sso.api", "files.api" },
        assert(cli.parse_rolling({ "--service", "sso.redis,sso.api", "--service=files.api" })).service_names)
    end)

    it("requires --deploy and --deploy-path together, for chosen services", function()
      assert.same({ nil, "--deploy needs --deploy-path DIR (the new code to deploy)" },
        { cli.parse_rolling({ "--service", "a", "--deploy" }) })
      assert.same({ nil, "--deploy-path needs --deploy (say it twice: this replaces code)" },
        { cli.parse_rolling({ "--service", "a", "--deploy-path", "/tmp/d" }) })
      assert.same({ nil, "--deploy needs --service (the service whose working_dir receives the code, or the "
        .. "replicas of one group)" }, { cli.parse_rolling({ "--deploy", "--deploy-path", "/tmp/d" }) })
      -- several services: accepted here, and checked against the services file (one group) by the run
      assert.is_truthy(cli.parse_rolling({ "--service", "a,b", "--deploy", "--deploy-path", "/tmp/d" }))
      assert.same({ nil, "--canary-only and --promote contradict each other (hold the canary, or roll the rest)" },
        { cli.parse_rolling({ "--canary-only", "--promote" }) })
    end)

    it("requires --parallel to be an integer >= 0 (0: no limit)", function()
      assert.equal(0, assert(cli.parse_rolling({ "--parallel", "0" })).parallel)
      assert.same({ nil, "--parallel must be an integer >= 0 (0: no limit), got -1" }, { cli.parse_rolling({ "--parallel=-1" }) })
      assert.same({ nil, "--parallel must be an integer >= 0 (0: no limit), got 1.5" }, { cli.parse_rolling({ "--parallel=1.5" }) })
      assert.same({ nil, 'option --parallel expects a number, got "many"' },
        { cli.parse_rolling({ "--parallel", "many" }) })
      assert.equal(8, assert(cli.parse_rolling({ "--parallel", "8" })).parallel)
    end)

    it("refuses an empty value and a forgotten one for every option that takes a value", function()
      for _, option in ipairs(cli.rolling_spec.options) do
        if option.type then
          local flag = "--" .. option.name
          assert.same({ nil, ("option %s needs a value (%s), got an empty string"):format(flag, option.value) },
            { cli.parse_rolling({ flag, "" }) }, flag)
          assert.same({ nil, ("option %s needs a value (%s)"):format(flag, option.value) },
            { cli.parse_rolling({ flag, "--dry-run" }) }, flag)
          assert.same({ nil, ("option %s needs a value (%s)"):format(flag, option.value) },
            { cli.parse_rolling({ "--dry-run", flag }) }, flag)
        end
      end
    end)

    it("rejects a positional argument, pointing at --service", function()
      assert.same({ nil, 'unexpected argument "sso.api" (choose services with --service NAME)' },
        { cli.parse_rolling({ "sso.api" }) })
    end)

    it("suggests the closest rolling option", function()
      assert.same({ nil, "unknown option --foo (did you mean --force?)" }, { cli.parse_rolling({ "--foo" }) })
      assert.same({ nil, "unknown option --servic (did you mean --service?)" }, { cli.parse_rolling({ "--servic" }) })
      assert.same({ nil, "unknown option --deploy_path (did you mean --deploy-path?)" },
        { cli.parse_rolling({ "--deploy_path", "/x" }) })
      assert.same({ nil, "unknown option --skip-migration (did you mean --skip-migrations?)" },
        { cli.parse_rolling({ "--skip-migration" }) })
    end)

    it("skips the cross-field rules for --help", function()
      assert.equal(true, assert(cli.parse_rolling({ "--deploy", "--help" })).help)
      assert.equal(true, assert(cli.parse_rolling({ "-h", "stray" })).help)
    end)

    it("has usage with examples first, then options, then exit codes", function()
      local usage = cli.rolling_usage()
      assert.equal("Usage: rrengine plans/rolling.lua [options]\n", usage:match("^[^\n]*\n"))
      local examples = assert(usage:find("\nExamples:\n", 1, true))
      local options = assert(usage:find("\nOptions:\n", 1, true))
      local codes = assert(usage:find("\nExit codes:\n", 1, true))
      assert.is_true(examples < options and options < codes)
      assert.truthy(usage:find("  rrengine plans/rolling.lua --service sso.api --deploy --deploy-path /tmp/deploy/sso-api\n",
        1, true))
      for _, option in ipairs(cli.rolling_spec.options) do
        assert.truthy(usage:find("--" .. option.name, options, true), option.name)
      end
      assert.truthy(usage:find("\n  --services FILE ", 1, true))
      assert.truthy(usage:find("\n  -h, --help ", 1, true))
      for _, line in ipairs({
        "  0    every service succeeded\n",
        "  1    a service failed and was rolled back, or was not touched\n",
        "  2    usage or configuration error: nothing was touched\n",
        "  3    a rollback failed: manual action needed (the output says what)\n",
        "  130  interrupted (Ctrl-C, SIGTERM, SIGHUP): no new service started; the one\n",
      }) do
        assert.truthy(usage:find(line, codes, true), line)
      end
      for line in usage:gmatch("[^\n]+") do
        -- Wrapped to fit a terminal, except a long example command to copy.
        assert.is_true(#line <= 78 or line:match("^  rrengine ") ~= nil, line)
      end
    end)
  end)
end)
