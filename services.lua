-- EXAMPLE platform definition: not a real deployment. It shows the shape of a
-- services file (the README's "services.lua" and rrengine-services(5)): replace the units, URLs and paths
-- with your platform's own. spec/unit/services_spec.lua checks that it
-- validates, so it stays a correct example.
--
-- Fields of a service:
--   name            unique name, used by --service (letters, digits, . _ : @ -)
--   unit            the systemd unit (foo.service, foo@instance.service, ...)
--   kind            free text for people and plans ("db", "api", "ml", ...)
--   depends         names of the services restarted (and healthy) before this one
--   health          "systemd" (unit active; the default), "none", or an HTTP check
--                   { url = "http://...", timeout = s, retries = n, interval = s,
--                     expect_body = "plain substring of the body" }
--   stabilize       seconds to watch the service after its restart
--   working_dir     absolute path: deploy target, where migrations run
--   migrate         argv run in working_dir before the restart
--   migrate_rollback argv run on rollback, before the old code starts again
--   reload          try a reload before a restart
--   hooks           hook script (relative paths: from this file's directory)
--   deploy_delete   rsync --delete on deploy (files missing from the deploy go)
--   start_timeout / stop_timeout   seconds to wait for the unit's start/stop job
--   group           the replica group the service belongs to (see `groups`)
--   balancer_server its server name at the group's balancer (default: its name)
-- `defaults` applies to every service that does not say otherwise.
--
-- `groups` names sets of replicas: at most `max_unavailable` of them (a count or
-- "N%" of the members) are down at once, whatever --parallel says; with a
-- `balancer` (HAProxy's admin socket and backend, or a Lua script), each member
-- is drained before its restart and put back once it is healthy again.

return {
  defaults = {
    health = { timeout = 30, retries = 3, interval = 1 },
    stabilize = 30,
  },

  groups = {
    -- Three replicas behind HAProxy (backend "search_api", servers named as
    -- the services): one restarts at a time, without traffic.
    ["search.api"] = { max_unavailable = 1, drain_timeout = 30,
                       balancer = { haproxy = "/run/haproxy/admin.sock", backend = "search_api" } },
  },

  services = {
    -- Infrastructure: checked through systemd (active = healthy).
    { name = "sso.postgresql", unit = "lilith-sso-postgresql.service", kind = "db",
      health = "systemd", stabilize = 10 },
    { name = "sso.redis", unit = "lilith-sso-redis.service", kind = "cache",
      health = "systemd", stabilize = 10 },
    { name = "minio", unit = "lilith-minio.service", kind = "storage",
      health = "systemd" },

    -- Core APIs: HTTP health endpoints.
    { name = "sso.api", unit = "lilith-sso-api.service", kind = "api",
      depends = { "sso.postgresql", "sso.redis" },
      health = { url = "http://localhost:3001/health" },
      working_dir = "/var/www/lilith/codebase/features/sso/backend-api",
      migrate = { "npx", "prisma", "migrate", "deploy" },
      reload = true,
      hooks = "hooks/sso.lua" },
    { name = "files.api", unit = "lilith-files-api.service", kind = "api",
      depends = { "sso.api", "minio" },
      health = { url = "http://localhost:3002/health", expect_body = "\"status\":\"ok\"" },
      working_dir = "/var/www/lilith/codebase/features/files/backend-api",
      reload = true },
    { name = "gateway", unit = "lilith-gateway.service", kind = "api",
      depends = { "sso.api", "files.api" },
      health = { url = "http://localhost:8080/healthz", timeout = 15 },
      stabilize = 15 },

    -- Replicas of one API: a template unit, one instance per port.
    { name = "search.api.1", unit = "lilith-search-api@1.service", kind = "api", group = "search.api",
      depends = { "sso.api" }, health = { url = "http://localhost:3201/health" } },
    { name = "search.api.2", unit = "lilith-search-api@2.service", kind = "api", group = "search.api",
      depends = { "sso.api" }, health = { url = "http://localhost:3202/health" } },
    { name = "search.api.3", unit = "lilith-search-api@3.service", kind = "api", group = "search.api",
      depends = { "sso.api" }, health = { url = "http://localhost:3203/health" } },

    -- ML pipeline: the model server loads its weights for minutes (its
    -- readiness endpoint answers 503 meanwhile), the worker needs it ready.
    { name = "ml.model-server", unit = "lilith-ml-model-server.service", kind = "ml",
      health = { url = "http://localhost:8500/ready", timeout = 600, interval = 5 },
      working_dir = "/srv/lilith/ml/model-server",
      stabilize = 60,
      start_timeout = 900 },
    { name = "ml.worker", unit = "lilith-ml-worker@default.service", kind = "ml",
      depends = { "ml.model-server", "sso.redis", "minio" },
      health = "systemd" },
  },
}
