"""Retrieval: parsing files to text, chunking, the keyword and vector index,
embeddings, hybrid ranking, and the background ingestion of vector store files."""
