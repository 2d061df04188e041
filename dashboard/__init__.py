"""dashboard: what analysts see. A Streamlit app that follows FinPulse's output topics and shows live sentiment
trends per topic and ticker, volumes, alerts and the messages behind each move.
"""
