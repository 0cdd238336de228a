"""Site-side privacy: the durable ledger of ε spent and its RDP accountant.

Importing this package does not load Opacus (nor torch): ``fedmri client privacy``
reads the ledger without them; computing ε loads them on first use.
"""

from fedmri.accounting import ACCOUNTANT, rdp_accountant, rdp_epsilon
from fedmri.client.privacy.ledger import (
    LEDGER_FILE,
    UNITS,
    LedgerConflictError,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    PrivacyLedger,
    StageSpend,
    default_ledger_path,
)

__all__ = [
    "ACCOUNTANT", "LEDGER_FILE", "LedgerConflictError", "LedgerEntry", "LedgerError", "LedgerSummary",
    "PrivacyLedger", "StageSpend", "UNITS", "default_ledger_path", "rdp_accountant", "rdp_epsilon",
]
