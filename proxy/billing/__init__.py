"""Who pays and how much: authentication and payer, the credit guard, metering
(usage normaliser and estimate), offline tokens, pricing, the request record and
its settlement. Never talks to Kafka."""
