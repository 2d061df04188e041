"""The label sets both heads predict, in the order of the public data sets' integer labels."""

TOPICS: tuple[str, ...] = (
    "Analyst Update", "Fed | Central Banks", "Company | Product News", "Treasuries | Corporate Debt",
    "Dividend", "Earnings", "Energy | Oil", "Financials", "Currencies", "General News | Opinion",
    "Gold | Metals | Materials", "IPO", "Legal | Regulation", "M&A | Investments", "Macro", "Markets",
    "Politics", "Personnel Change", "Stock Commentary", "Stock Movement",
)

# The public sentiment set's integer labels: 0 bearish, 1 bullish, 2 neutral.
SENTIMENTS_BY_DATASET_ID: tuple[str, ...] = ("bearish", "bullish", "neutral")
SENTIMENTS: tuple[str, ...] = ("bearish", "neutral", "bullish")

# Finance sentiment sets labeled from an investor's point of view (Financial PhraseBank, FiQA and most others) say
# positive / negative: the same judgement as bullish / bearish, so files labeled either way load as they are.
SENTIMENT_SYNONYMS: dict[str, str] = {"positive": "bullish", "negative": "bearish"}
