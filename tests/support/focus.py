"""The FinOps FOCUS columns a finance team's tools expect in a Tollgate export."""

from __future__ import annotations

#: Every column the billing issue names; each FOCUS export must have all of them.
FOCUS_NAMED_COLUMNS = frozenset(
    {
        "BilledCost",
        "EffectiveCost",
        "ListCost",
        "ListUnitPrice",
        "BillingCurrency",
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "ChargeCategory",
        "ChargeDescription",
        "ConsumedQuantity",
        "ConsumedUnit",
        "PricingQuantity",
        "PricingUnit",
        "ResourceId",
        "ServiceName",
        "SubAccountId",
        "SubAccountName",
    }
)
