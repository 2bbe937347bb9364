"""Millrace settings. Everything that differs between machines comes from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.common.env import default_block_memory_mb, envage, envbool, envfloat, envint, secret_key

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("MILLRACE_VAR_DIR", BASE_DIR / "var"))

SECRET_KEY = secret_key(VAR_DIR)
DEBUG = envbool("DEBUG", False)
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_filters",
    "django_htmx",
    # Before django_q: its `qcluster` command is replaced by the one in runs (see
    # runs/cluster.py), and Django takes a command from the first app that has it.
    "io_connectors",
    "pipelines",
    "runs",
    "triggers",
    "django_q",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dj_database_url.DBConfig:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{VAR_DIR / 'millrace.sqlite3'}"
    if not url.startswith(("sqlite:", "postgres:", "postgresql:")):
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a sqlite:// or postgres:// URL; got {url.split(':', 1)[0]}://..."
        )
    db = dj_database_url.parse(url, conn_max_age=envint("DB_CONN_MAX_AGE", 600))
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the web process read while a worker writes; IMMEDIATE takes the write
        # lock at BEGIN so two writers queue on the busy timeout instead of one failing
        # with "database is locked" when it upgrades a read transaction.
        db["OPTIONS"] = {
            "timeout": envint("SQLITE_BUSY_TIMEOUT", 30),
            "transaction_mode": "IMMEDIATE",
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;"
            ),
        }
        db["CONN_MAX_AGE"] = 0 if db.get("CONN_MAX_AGE") is None else db["CONN_MAX_AGE"]
        db.setdefault("TEST", {})["NAME"] = os.environ.get("SQLITE_TEST_NAME") or str(
            VAR_DIR / "test_millrace.sqlite3"
        )
    else:
        db["CONN_HEALTH_CHECKS"] = True
    return db


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns on every request otherwise
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/pipelines/"
LOGOUT_REDIRECT_URL = "/login/"

REDIS_URL = os.environ.get("REDIS_URL", "").strip()
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Millrace's own settings.
MILLRACE_DATA_DIR = Path(os.environ.get("MILLRACE_DATA_DIR", VAR_DIR / "data"))
# At most this many block runs queued or running at once, across every pipeline.
MILLRACE_CONCURRENCY = envint("MILLRACE_CONCURRENCY", 20, minimum=0)
if MILLRACE_CONCURRENCY == 0:
    # Mage reads 0 as "no limit"; here it would leave every block queued forever.
    raise ImproperlyConfigured(
        "MILLRACE_CONCURRENCY is 0: no block could ever run. Set the number of block runs "
        "allowed to run at once (at least 1; the default is 20)."
    )
# A running block run whose heartbeat is older than this is treated as dead.
MILLRACE_HEARTBEAT_LIMIT = envint("MILLRACE_HEARTBEAT_LIMIT", 60, minimum=5)
# How often a worker refreshes the heartbeat of the block it runs (and looks for a cancel).
MILLRACE_HEARTBEAT_INTERVAL = envfloat("MILLRACE_HEARTBEAT_INTERVAL", 2.0)
# Run the next block of a chain in the same worker instead of a broker round trip.
MILLRACE_INLINE_CHAIN = envbool("MILLRACE_INLINE_CHAIN", True)
# On PostgreSQL, the statements every block goes through are prepared once per
# connection. Turn off behind a pooler in transaction mode (PgBouncer's default is
# session mode, which is fine).
MILLRACE_PREPARED_STATEMENTS = envbool("MILLRACE_PREPARED_STATEMENTS", True)
# Log lines stored per block run attempt; past it the head and the tail are kept and
# the whole output goes to a compressed file beside the block's outputs. 0: no cap.
MILLRACE_LOG_LINES_PER_BLOCK = envint("MILLRACE_LOG_LINES_PER_BLOCK", 10_000, minimum=0)
# The most memory a block's process may hold, in MB (0: no limit). By default three
# quarters of the machine's memory shared among the worker processes, so that blocks
# running at once cannot together exhaust it.
MILLRACE_BLOCK_MEMORY_MB = envint("MILLRACE_BLOCK_MEMORY_MB", default_block_memory_mb(), minimum=0)
# On SIGTERM or SIGINT a worker cluster takes no new block and lets running blocks
# finish for this many seconds; then it kills them and hands their block runs back.
MILLRACE_SHUTDOWN_GRACE = envfloat("MILLRACE_SHUTDOWN_GRACE", 20.0)
# A worker cluster whose own heartbeat is older than this many seconds is presumed
# dead: its running block runs are failed or retried and its prefetched tasks sent again.
MILLRACE_CLUSTER_HEARTBEAT_LIMIT = envint("MILLRACE_CLUSTER_HEARTBEAT_LIMIT", 10, minimum=3)
# Finished runs older than this (an age: 90d, 12h, 2w) are deleted once a day by the
# scheduler, with their block runs, logs and stored outputs; unset keeps them all.
MILLRACE_RUN_RETENTION = envage("MILLRACE_RUN_RETENTION")

_Q_TIMEOUT = envint("MILLRACE_TASK_TIMEOUT", 7 * 24 * 3600, minimum=60)
Q_CLUSTER = {
    "name": os.environ.get("MILLRACE_QUEUE", "millrace"),
    "workers": envint("MILLRACE_WORKERS", min(4, os.cpu_count() or 2), minimum=1),
    "recycle": 500,
    # Block timeouts are enforced by Millrace itself (it kills the block's process group);
    # this is only a backstop for a worker that hangs outside user code.
    "timeout": _Q_TIMEOUT,
    "retry": _Q_TIMEOUT + 60,
    "max_attempts": 1,
    "ack_failures": True,
    "save_limit": -1,
    "poll": envfloat("MILLRACE_BROKER_POLL", 0.05),
    "catch_up": False,
    "label": "Task queue",
}
if REDIS_URL and envbool("MILLRACE_REDIS_BROKER", False):
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

REST_FRAMEWORK = {
    # Token first: its `WWW-Authenticate` header makes an anonymous call a 401, not a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "config.common.permissions.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Reading needs a login or a token; writing needs an editor (config/common/permissions.py).
    "DEFAULT_PERMISSION_CLASSES": ["config.common.permissions.CanEdit"],
    # JSON only: no browsable HTML, so every answer (errors included) is JSON. Bodies
    # are parsed with config.common.jsonsafe's rules; a stored value JSON cannot carry
    # is rendered escaped rather than failing the answer (config/common/api.py).
    "DEFAULT_RENDERER_CLASSES": ["config.common.api.SafeJSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["config.common.api.StrictJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "config.common.api.MagePagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "config.common.api.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Millrace API",
    "DESCRIPTION": "Pipelines, triggers (Mage's pipeline schedules), runs and events, "
    "with Mage's resource names and envelopes.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["config.common.permissions.CanView"],
    "SCHEMA_PATH_PREFIX": "/api/",
    "COMPONENT_SPLIT_REQUEST": True,
    "PREPROCESSING_HOOKS": ["config.common.api.drop_slash_twins"],
    "ENUM_NAME_OVERRIDES": {
        "PipelineRunStatusEnum": "runs.models.PipelineRunStatus",
        "BlockRunStatusEnum": "runs.models.BlockRunStatus",
        "TriggerStatusEnum": "triggers.models.TriggerStatus",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django-q": {"level": os.environ.get("Q_LOG_LEVEL", "WARNING")}},
}
