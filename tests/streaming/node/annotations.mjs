// Streams a cited file_search run and a code_interpreter run that links a file
// with the official Node SDK (server at process.argv[2], SDK package
// process.argv[3]) and prints, as one JSON line, what a client consuming the
// stream builds: the concatenated textDelta values, the annotations found on
// those deltas, and the final text (issue 12, wire notes 3.3).
const { default: OpenAI, toFile } = await import(process.argv[3]);

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-test", maxRetries: 0, timeout: 30_000 });

async function vectorStore() {
  const text = "Our refund policy: refunds are accepted within 30 days of purchase with a receipt.";
  const file = await client.files.create({
    file: await toFile(Buffer.from(text), "policy.txt", { type: "text/plain" }),
    purpose: "assistants",
  });
  let store = await client.vectorStores.create({ name: "policies", file_ids: [file.id] });
  const deadline = Date.now() + 30_000;
  while (store.file_counts.completed < 1) {
    if (store.file_counts.failed > 0 || Date.now() > deadline) throw new Error(`ingestion: ${JSON.stringify(store)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
    store = await client.vectorStores.retrieve(store.id);
  }
  return store.id;
}

async function consume(assistant, content) {
  const thread = await client.beta.threads.create({ messages: [{ role: "user", content }] });
  const seen = { text: "", values: [], annotations: [] };
  const stream = client.beta.threads.runs.stream(thread.id, { assistant_id: assistant.id });
  stream.on("textDelta", (delta) => {
    if (typeof delta.value !== "string") throw new Error(`a text delta without value: ${JSON.stringify(delta)}`);
    seen.text += delta.value;
    for (const annotation of delta.annotations ?? []) seen.annotations.push({ ...annotation, value: delta.value });
  });
  const run = await stream.finalRun();
  const messages = await stream.finalMessages();
  const last = messages[messages.length - 1];
  seen.final = last.content[last.content.length - 1].text;
  seen.status = run.status;
  return seen;
}

const cited = await client.beta.assistants.create({
  model: "gpt-4o",
  tools: [{ type: "file_search" }],
  tool_resources: { file_search: { vector_store_ids: [await vectorStore()] } },
});
const coder = await client.beta.assistants.create({ model: "gpt-4o", tools: [{ type: "code_interpreter" }] });
const code = "open('/mnt/data/out.csv', 'w').write('a,b')";
const result = {
  citation: await consume(
    cited,
    '[[call file_search {"query": "refund policy"}]] [[then reply See 【1:0†policy.txt】 for details.]]',
  ),
  link: await consume(
    coder,
    `[[call code_interpreter {"code": "${code}"}]] [[then reply Download [the table](sandbox:/mnt/data/out.csv) now.]]`,
  ),
};
console.log(JSON.stringify(result));
