// JavaFetch — a real JVM client for the suite: fetches each URL once, in order, with the
// JDK's own HTTP stacks, and saves each body to SAVE_DIR/<index>.
//   java JavaFetch --lib urlconnection|httpclient [--header 'Name: value']... [--save-dir D]
//        [--concurrent] URL...
// urlconnection: java.net.HttpURLConnection (blocking sockets, its own keep-alive cache);
// httpclient:    java.net.http.HttpClient over HTTP/1.1 (NIO: non-blocking sockets, epoll);
//                with --concurrent every URL is asked at once (sendAsync), then awaited.
// --then-urlconnection: afterwards, in the same JVM, every URL again with HttpURLConnection.
// Prints one JSON line per URL: {"url":..., "status":N, "len":N, "sha256":"...", "error":...}.
import java.io.*;
import java.net.*;
import java.net.http.*;
import java.nio.file.*;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.*;

public class JavaFetch {
    static String hex(byte[] b) throws Exception {
        StringBuilder s = new StringBuilder();
        for (byte x : MessageDigest.getInstance("SHA-256").digest(b)) s.append(String.format("%02x", x));
        return s.toString();
    }

    static String quote(String s) {
        return s == null ? "null" : "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
    }

    public static void main(String[] args) throws Exception {
        String lib = "urlconnection", saveDir = null;
        boolean concurrent = false, thenUrlConnection = false;
        List<String[]> headers = new ArrayList<>();
        List<String> urls = new ArrayList<>();
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--lib": lib = args[++i]; break;
                case "--save-dir": saveDir = args[++i]; break;
                case "--concurrent": concurrent = true; break;
                case "--then-urlconnection": thenUrlConnection = true; break;
                case "--header": {
                    String h = args[++i];
                    int c = h.indexOf(':');
                    headers.add(new String[] { h.substring(0, c).trim(), h.substring(c + 1).trim() });
                    break;
                }
                default: urls.add(args[i]);
            }
        }
        HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(20)).build();
        List<java.util.concurrent.CompletableFuture<HttpResponse<byte[]>>> inFlight = new ArrayList<>();
        if (concurrent) {
            for (String url : urls) {
                HttpRequest.Builder rb = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(20));
                for (String[] h : headers) rb.header(h[0], h[1]);
                inFlight.add(client.sendAsync(rb.build(), HttpResponse.BodyHandlers.ofByteArray()));
            }
        }
        int failed = 0;
        for (int n = 0; n < urls.size() * (thenUrlConnection ? 2 : 1); n++) {
            int i = n % urls.size();
            if (n == urls.size()) {
                lib = "urlconnection";
                concurrent = false;
            }
            String url = urls.get(i), error = null;
            int status = 0;
            byte[] body = null;
            try {
                if (concurrent) {
                    HttpResponse<byte[]> r = inFlight.get(i).get();
                    status = r.statusCode();
                    body = r.body();
                } else if (lib.equals("httpclient")) {
                    HttpRequest.Builder rb = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofSeconds(20));
                    for (String[] h : headers) rb.header(h[0], h[1]);
                    HttpResponse<byte[]> r = client.send(rb.build(), HttpResponse.BodyHandlers.ofByteArray());
                    status = r.statusCode();
                    body = r.body();
                } else {
                    HttpURLConnection c = (HttpURLConnection) new URL(url).openConnection();
                    c.setConnectTimeout(20000);
                    c.setReadTimeout(20000);
                    for (String[] h : headers) c.setRequestProperty(h[0], h[1]);
                    status = c.getResponseCode();
                    try (InputStream in = c.getInputStream()) { body = in.readAllBytes(); }
                }
                if (saveDir != null) Files.write(Paths.get(saveDir, Integer.toString(n)), body);
            } catch (Exception e) {
                error = e.toString();
                failed++;
            }
            System.out.println("{\"url\": " + quote(url) + ", \"status\": " + status + ", \"len\": "
                    + (body == null ? -1 : body.length) + ", \"sha256\": " + quote(body == null ? null : hex(body))
                    + ", \"error\": " + quote(error) + "}");
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
