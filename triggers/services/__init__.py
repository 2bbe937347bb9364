"""Every write of the triggers app: triggers, API calls, events and backfills.

CONTRACT (agreed between the lead and the helpers; keep the signatures):
every function validates its input and raises `django.core.exceptions.ValidationError`
with a dict naming the field (`{"schedule_interval": ["..."]}`) and changes nothing
when the input is bad.

Runs are only ever created through `runs.orchestrator.run_create`, with the trigger's
variables under the caller's and the trigger's timeout and SLA settings copied onto the
run.

One module per sub-topic; callers import from here (`from triggers import services`):

- `validation`: the field checks every service (and the admin's forms) run;
- `triggers`: create, update (fields and status in one go), activate, pause, delete,
  run once now, and the run a trigger makes;
- `api_trigger`: the API trigger's token and firing a run from it;
- `events`: recording an event and the runs of the triggers it matches;
- `backfills`: one run per logical date, cancelling, finishing.
"""

from triggers.services.api_trigger import (
    TokenRejected,
    TriggerInactive,
    TriggerNotFound,
    trigger_fire_api,
    trigger_rotate_token,
)
from triggers.services.backfills import (
    MAX_BACKFILL_RUNS,
    backfill_cancel,
    backfill_create,
    backfill_dates,
    backfills_update_status,
)
from triggers.services.events import event_matches, event_record
from triggers.services.triggers import (
    first_run_at,
    trigger_activate,
    trigger_create,
    trigger_create_run,
    trigger_delete,
    trigger_pause,
    trigger_run_now,
    trigger_update,
)
from triggers.services.validation import (
    SETTINGS_KEYS,
    TRIGGER_FIELDS,
    validate_event_matcher,
    validate_json_object,
    validate_settings,
    validate_trigger_fields,
)

__all__ = [
    "MAX_BACKFILL_RUNS",
    "SETTINGS_KEYS",
    "TRIGGER_FIELDS",
    "TokenRejected",
    "TriggerInactive",
    "TriggerNotFound",
    "backfill_cancel",
    "backfill_create",
    "backfill_dates",
    "backfills_update_status",
    "event_matches",
    "event_record",
    "first_run_at",
    "trigger_activate",
    "trigger_create",
    "trigger_create_run",
    "trigger_delete",
    "trigger_fire_api",
    "trigger_pause",
    "trigger_rotate_token",
    "trigger_run_now",
    "trigger_update",
    "validate_event_matcher",
    "validate_json_object",
    "validate_settings",
    "validate_trigger_fields",
]
