"""Metrics, the access log and the observer the request path reports to.
Records what happened; decides nothing."""
