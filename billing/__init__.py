"""Billing: usage events, the price book, the ledger, invoices and finance exports.

Knows usage and money, nothing of HTTP.
"""
