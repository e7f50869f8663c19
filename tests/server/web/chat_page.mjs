// Drives the chat page in headless Chromium (Debian's /usr/bin/chromium) with playwright-core:
// a text message, an image attachment, the thinking toggle and a microphone recording (Chromium's
// fake device), each answer streamed. Prints one JSON line; writes a screenshot.
// usage: node chat_page.mjs URL SCREENSHOT.png IMAGE.png        (media: text, image, recording)
//        node chat_page.mjs URL SCREENSHOT.png --thinking        (one message with thinking on)
import { chromium } from "playwright-core";

const [url, screenshot, image] = process.argv.slice(2);
const thinkingOnly = image === "--thinking";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
});
const out = { replies: [], updates: [], requests: [], errors: [], external: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") out.errors.push(m.text()); });
  await page.route("**/*", (route) => {
    const req = route.request();
    if (new URL(req.url()).hostname !== "127.0.0.1") { out.external.push(req.url()); return route.abort(); }
    if (req.url().endsWith("/v1/chat/completions")) out.requests.push(JSON.parse(req.postData()));
    return route.continue();
  });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model").textContent !== "…");
  out.model = await page.textContent("#model");
  await page.fill("#temperature", "0");
  await page.fill("#max-tokens", thinkingOnly ? "200" : "12");

  // count how often each answer's text changes while it streams
  await page.evaluate(() => {
    window.__updates = [];
    new MutationObserver(() => {
      const all = document.querySelectorAll(".msg.assistant");
      const i = all.length - 1;
      window.__updates[i] = (window.__updates[i] || 0) + 1;
    }).observe(document.getElementById("log"), { subtree: true, characterData: true, childList: true });
  });

  async function send(text) {
    const n = await page.locator(".msg.assistant").count();
    await page.fill("#input", text);
    await page.click("#send");
    await page.waitForFunction((k) => document.querySelectorAll(".msg.assistant.done").length > k, n,
                               { timeout: 120000 });
    const last = page.locator(".msg.assistant").last();
    out.replies.push({
      content: await last.locator(".content").textContent(),
      reasoning: await last.locator(".reasoning").textContent(),
      stats: await last.locator(".stats").textContent(),
      failed: await last.locator(".error").count(),
    });
  }

  if (thinkingOnly) {
    await page.check("#thinking");
    await send("hi");
    out.thinkingOpen = await page.locator(".msg.assistant details.thinking").last().isVisible();
    await page.click(".msg.assistant details.thinking summary");  // show the collapsed thoughts
    await page.screenshot({ path: screenshot, fullPage: true });
    throw null;  // done
  }
  await send("Hello there");
  await page.setInputFiles("#attach-input", image);
  await page.waitForSelector("#attachments .chip img");
  await send("What is in this picture?");
  await page.check("#thinking");
  await page.click("#record");
  await page.waitForTimeout(1500);
  await page.click("#record");
  await page.waitForSelector("#attachments .chip", { timeout: 10000 });
  out.recording = await page.textContent("#attachments");
  await send("Transcribe this.");
  out.updates = await page.evaluate(() => window.__updates);
  await page.screenshot({ path: screenshot, fullPage: true });
} catch (e) {
  if (e !== null) out.errors.push("driver: " + (e && e.stack ? e.stack : String(e)));
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
