"""Search with nothing configured: hybrid, BM25 fused with the minilm-static
vectors (app/retrieval/static_minilm.py), on both databases. A question that
shares no word with its document still finds it."""

from __future__ import annotations

import openai

DOCUMENTS = {
    "copying.txt": "shutil — High-level file operations\ncopytree() recursively copies an entire directory tree.",
    "random.txt": "random — Generate pseudo-random numbers\nReturn the next floating point number in [0.0, 1.0).",
    "mail.txt": "smtplib — SMTP protocol client\nAn SMTP instance encapsulates a connection to a mail server.",
}


async def test_a_paraphrase_finds_its_document_with_nothing_configured(client: openai.AsyncOpenAI) -> None:
    store = await client.vector_stores.create()
    ids = {}
    for name, text in DOCUMENTS.items():
        ids[name] = (await client.files.create(file=(name, text.encode()), purpose="assistants")).id
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=list(ids.values()))
    assert batch.file_counts.completed == len(DOCUMENTS)
    page = await client.vector_stores.search(store.id, query="how do I duplicate a folder with everything inside it")
    assert page.data and page.data[0].file_id == ids["copying.txt"]
    assert all(0 < result.score <= 1 for result in page.data)
    # A chunk first by keywords and by meaning scores 1.
    emails = await client.vector_stores.search(store.id, query="SMTP mail server connection")
    assert emails.data[0].file_id == ids["mail.txt"] and emails.data[0].score == 1
