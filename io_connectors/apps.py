from django.apps import AppConfig


class IoConnectorsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "io_connectors"
