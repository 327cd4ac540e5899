"""The update lifecycle: the manual's rules as runs, steps, timers and maintenance windows.

Where each rule of the update manual lives (the rules are described for users in
``docs/lifecycle.md``):

====  =====================================  ================================================
rule  what                                   where
====  =====================================  ================================================
L1    download (fetch, verify, stage)        ``updates.Lifecycle.start`` ("download"),
                                             ``updates.Lifecycle.fetch_and_stage``
L2    auto-update (install what is pending)  ``updates.Lifecycle`` flows, the ``step_*``
                                             methods of ``steps.UpdateSteps``
L3    maintenance operation, notices,        ``maintenance.Maintenance``
      logon lock
L4    scheduled update (S - 1 h prepare,     ``scheduled.ScheduledRuns``, timers in
      notices, drain, install at S)          ``scheduler.Scheduler``, times in ``calendar``
L5    download retry policy (10 + 10)        ``core.repository.retry.RetryPolicy``
L6    update lock                            ``updates.Lifecycle.set_lock`` / ``remove_lock``,
                                             set by ``steps.UpdateSteps.update_failed``
L7    warning flag                           ``updates.Lifecycle.set_warning_flag``
L8    hotfixes (urgency, selection)          ``pending.pending_packages``
L9    catch-up from oldstable                ``pending.catch_up``, kinds ``oldstable-*``
L9a   optional packages                      ``updates`` kind ``install``
L10   integrity check                        ``steps.UpdateSteps.step_integrity``
L11   roles                                  ``bot.grammar`` (outside core)
L12   cluster slots (at most N nodes out of  ``slots.SlotGate``, rows in ``core.store.slots``
      load balancing)
L13   audit and history                      ``engine.Engine`` (every change audited),
                                             ``core.store.audit``
L14   escalation of urgent hotfixes          ``notify.escalation`` (outside core)
L15   crash safety (runs persisted step by   ``runs.execute``, ``updates.Lifecycle.recover``
      step, recovered after a restart)
====  =====================================  ================================================

Modules: ``engine`` (the fleet's state and every change to it), ``runs`` (a run as a list of
persisted steps), ``updates`` (the ``Lifecycle``: starting runs, locks, recovery),
``steps`` (the steps of an update on one node), ``scheduled`` and ``scheduler`` (time-
controlled runs and their timers), ``calendar`` (when schedules fire), ``maintenance``,
``slots``, ``pending`` (what a node should install), ``leader`` (which instance runs
timers).

May import: the vocabulary at the top of ``core``, ``core.store``, ``core.repository``,
``core.drivers``' protocols via ``core.interfaces``. Never ``bot`` or ``notify``.
"""
