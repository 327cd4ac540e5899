"""Notifications: e-mail, phone and SMS, user notices, the durable outbox.

- ``notifier`` (turns domain events into messages), ``outbox`` (durable, retried delivery),
  ``email`` + ``mime`` (SMTP), ``phone`` + ``calls`` (Twilio calls and SMS), ``escalation``
  (urgent hotfixes, L14), ``watch`` (new hotfixes in the manifest), ``webhooks`` (Twilio's
  callbacks), ``render`` + ``templates/`` (every text users and contacts read),
  ``i18n`` + ``locale/`` (German and English: the catalogue, local dates), ``notices``
  (the node notices the engine shows, in the node's language), ``errors``.

May import: ``core`` (it subscribes to core's events). Never ``bot``.
"""
