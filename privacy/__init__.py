"""Differential privacy, privacy ledger, accountants, budgets, audit and update sealing."""
