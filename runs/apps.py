from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def check_queue_settings(conf: dict) -> None:
    """Refuse django-q2 settings that would run a block twice at once: the broker hands a
    task to a second worker when it is not acknowledged within `retry` seconds, so
    `retry` must be above `timeout` (the longest a task may run), and the orchestrator,
    not the broker, decides about retries (`max_attempts: 1`)."""
    timeout, retry = conf.get("timeout"), conf.get("retry")
    if timeout is None or retry is None or retry <= timeout:
        raise ImproperlyConfigured(
            f"Q_CLUSTER['retry'] ({retry}) must be greater than Q_CLUSTER['timeout'] ({timeout}): otherwise "
            "the broker would hand a block that is still running to a second worker"
        )
    if conf.get("max_attempts", 0) != 1:
        raise ImproperlyConfigured(
            "Q_CLUSTER['max_attempts'] must be 1: retries of blocks belong to the orchestrator (retry_config), "
            "a broker retry would run a block again behind its back"
        )


class RunsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "runs"

    def ready(self) -> None:
        check_queue_settings(settings.Q_CLUSTER)
