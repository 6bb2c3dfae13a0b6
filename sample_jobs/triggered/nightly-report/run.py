"""A scheduled triggered job (see settings.job): writes a small report of the site's jobs."""

import datetime
import os

print(f"report at {datetime.datetime.now(datetime.UTC).isoformat()}")
print(f"run id: {os.environ.get('WEBJOBS_RUN_ID', '')}")
