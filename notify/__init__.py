"""Notifications: e-mail, phone and SMS, user notices, the durable outbox."""
