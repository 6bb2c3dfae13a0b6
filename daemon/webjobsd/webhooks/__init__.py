"""Webhooks: Kudu's hooks API (subscriptions) and the POSTs made after events.

* `subscriptions` owns the subscription file (`data/webjobsd/hooks.json`) and its validation.
* `events` names the events and builds their bodies (the run JSON for `TriggeredJobFinished`).
* `delivery` owns the queue and the task that POSTs, retries and records each hook's last status.

Producers (the end of a triggered run, the exit of a continuous job) only enqueue: a slow or dead
receiver can never delay a run or a restart.
"""
