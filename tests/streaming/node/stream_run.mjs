// Streams runs with the official Node SDK's AssistantStream against the server
// at process.argv[2], using the SDK installed under the package name
// process.argv[3] (see package.json), and prints what the helpers saw as one
// JSON line for tests/streaming/test_node_sdk.py. Exits non-zero on any error.
const { default: OpenAI } = await import(process.argv[3]);

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-test", maxRetries: 0, timeout: 30_000 });

const weatherTool = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } } },
  },
};

// Records the helper events of one stream, in order.
function watch(stream, seen) {
  stream
    .on("runStepCreated", (step) => seen.push(`runStepCreated:${step.type}`))
    .on("runStepDone", (step) => seen.push(`runStepDone:${step.type}`))
    .on("messageCreated", () => seen.push("messageCreated"))
    .on("textCreated", () => seen.push("textCreated"))
    .on("textDelta", (delta) => seen.push(`textDelta:${delta.value}`))
    .on("textDone", (text) => seen.push(`textDone:${text.value}`))
    .on("messageDone", () => seen.push("messageDone"))
    .on("toolCallCreated", (call) => seen.push(`toolCallCreated:${call.function.name}`))
    .on("toolCallDelta", (delta) => seen.push(`toolCallDelta:${delta.function.arguments}`))
    .on("toolCallDone", (call) => seen.push(`toolCallDone:${call.function.arguments}`));
  return stream;
}

async function textRun(assistantId) {
  const thread = await client.beta.threads.create({
    messages: [{ role: "user", content: "Hello from Node [[delay 5]]" }],
  });
  const seen = [];
  const stream = watch(client.beta.threads.runs.stream(thread.id, { assistant_id: assistantId }), seen);
  const run = await stream.finalRun();
  const messages = await stream.finalMessages();
  const listed = await client.beta.threads.messages.list(thread.id, { run_id: run.id });
  return { run, messages, listed: listed.data, seen };
}

async function weatherRun(assistantId) {
  const thread = await client.beta.threads.create({
    messages: [{ role: "user", content: 'Weather? [[call get_weather {"city": "Tokyo"}]]' }],
  });
  const seen = [];
  const first = watch(client.beta.threads.runs.stream(thread.id, { assistant_id: assistantId }), seen);
  const paused = await first.finalRun();
  const call = paused.required_action.submit_tool_outputs.tool_calls[0];
  const second = watch(
    client.beta.threads.runs.submitToolOutputsStream(paused.id, {
      thread_id: thread.id,
      tool_outputs: [{ tool_call_id: call.id, output: '{"temp": 22}' }],
    }),
    seen,
  );
  const run = await second.finalRun();
  const messages = await second.finalMessages();
  return { paused, run, messages, seen };
}

const assistant = await client.beta.assistants.create({ model: "gpt-4o", tools: [weatherTool] });
const result = { text: await textRun(assistant.id), weather: await weatherRun(assistant.id) };
console.log(JSON.stringify(result));
