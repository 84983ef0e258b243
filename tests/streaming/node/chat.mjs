// Chat completions, embeddings and models with the official Node SDK (server
// at process.argv[2], SDK package process.argv[3]); prints what it got as one
// JSON line for tests/streaming/test_node_sdk.py (issue 12).
const { default: OpenAI } = await import(process.argv[3]);

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-test", maxRetries: 0, timeout: 30_000 });
const weather = {
  type: "function",
  function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } },
};

const completion = await client.chat.completions.create({
  model: "gpt-4o",
  messages: [{ role: "user", content: "Hello from Node" }],
});

const stream = await client.chat.completions.create({
  model: "gpt-4o",
  messages: [{ role: "user", content: "Streamed from Node" }],
  stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}

// The SDK's helper accumulates streamed tool calls into a final completion.
const helper = client.chat.completions.stream({
  model: "gpt-4o",
  messages: [{ role: "user", content: '[[call get_weather {"city": "Oslo"}]]' }],
  tools: [weather],
});
const final = await helper.finalChatCompletion();

const embedding = await client.embeddings.create({ model: "text-embedding-3-small", input: "hello" });
const models = await client.models.list();

console.log(
  JSON.stringify({
    completion: completion.choices[0].message.content,
    streamed,
    usage,
    toolCalls: final.choices[0].message.tool_calls,
    dimensions: embedding.data[0].embedding.length,
    models: models.data.map((model) => model.id),
  }),
);
